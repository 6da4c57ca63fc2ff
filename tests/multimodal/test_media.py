"""Loading images from request URLs: what decodes, and everything that is refused (with the field named)."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from loom.errors import InvalidRequest
from loom.multimodal import MediaConfig, load_image
from loom.multimodal.media import address_is_public

PARAM = "messages[2].content[0].image_url"


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def picture(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_declaring(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header declares width x height pixels (its data is a few zero bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + chunk(b"IEND", b"")
    )


def refused(url: str, match: str, config: MediaConfig | None = None) -> InvalidRequest:
    with pytest.raises(InvalidRequest, match=match) as err:
        load_image(url, config or MediaConfig(), PARAM)
    assert err.value.param == PARAM
    return err.value


@pytest.mark.parametrize(
    ("fmt", "media_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_data_urls_decode_to_rgb(fmt, media_type):
    image = picture()
    loaded = load_image(data_url(encode(image, fmt), media_type), MediaConfig(), PARAM)
    assert loaded.image.mode == "RGB" and loaded.size == (40, 30)
    if fmt == "PNG":
        assert np.array_equal(np.asarray(loaded.image), np.asarray(image))


def test_content_hash_is_of_the_pixels():
    image = picture()
    png = load_image(data_url(encode(image, "PNG")), MediaConfig(), PARAM)
    webp = load_image(data_url(encode(image, "WEBP", lossless=True), "image/webp"), MediaConfig(), PARAM)
    rgba = image.convert("RGBA")
    rgba_png = load_image(data_url(encode(rgba, "PNG")), MediaConfig(), PARAM)
    other = load_image(data_url(encode(picture(seed=1), "PNG")), MediaConfig(), PARAM)
    # Same picture in another container (or with an alpha channel that is dropped): same hash.
    assert png.content_hash == webp.content_hash == rgba_png.content_hash
    assert png.content_hash != other.content_hash
    # Same bytes, other shape: different hash.
    flat = Image.fromarray(np.asarray(image).reshape(15, 80, 3))
    assert load_image(data_url(encode(flat, "PNG")), MediaConfig(), PARAM).content_hash != png.content_hash


def test_malformed_data_urls_are_refused():
    refused("data:image/png;base64,iVBORw0KGgo%%%not-base64", "malformed base64")
    refused("data:image/png;base64,iVBORw0KGgoAA", "malformed base64")  # bad padding
    refused("data:image/png," + "x" * 10, "base64-encoded")
    refused("data:text/plain;base64," + base64.b64encode(b"hello").decode(), "not an image")
    refused("data:image/png;base64", "no ','")
    refused(data_url(b"this is plain text, not an image at all"), "not a PNG, JPEG or WebP")
    refused(data_url(encode(picture(), "GIF"), "image/gif"), "not a PNG, JPEG or WebP")
    refused(data_url(encode(picture(), "BMP"), "image/bmp"), "not a PNG, JPEG or WebP")
    refused(data_url(encode(picture(), "PNG")[:60]), "could not be decoded")  # truncated
    refused("ftp://example.com/a.png", "unsupported image URL scheme")
    refused("", "non-empty")


def test_decompression_bombs_are_refused_before_decoding():
    bomb = png_declaring(100_000, 100_000)
    assert len(bomb) < 100
    refused(data_url(bomb), "too many pixels")  # over Pillow's own hard limit (2 x MAX_IMAGE_PIXELS)
    # Under Pillow's limit but over ours: refused from the header; decoding these bytes would fail otherwise.
    refused(data_url(png_declaring(8000, 8000)), r"declares 8000x8000 pixels.*refused before decoding")
    assert Image.MAX_IMAGE_PIXELS == 89478485  # untouched: our limit comes from the config, not a global
    small = MediaConfig(max_image_pixels=1000)
    refused(data_url(encode(picture(40, 30), "PNG")), "over the limit of 1000", small)


def test_size_limit_applies_before_base64_decoding():
    config = MediaConfig(max_image_bytes=1000)
    payload = data_url(encode(picture(200, 200), "PNG"))
    refused(payload, r"about \d+ bytes, over the limit of 1000", config)
    ok = data_url(encode(Image.new("RGB", (8, 8)), "PNG"))
    assert load_image(ok, config, PARAM).size == (8, 8)


# ---- file:// -----------------------------------------------------------------------------------------


@pytest.fixture
def media_root(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    picture().save(root / "sub" / "ok.png")
    secret = tmp_path / "secret.png"
    picture(seed=3).save(secret)
    os.symlink(secret, root / "escape.png")
    os.symlink(root / "sub" / "ok.png", root / "inside-link.png")
    os.symlink(tmp_path, root / "up")
    return root


def test_file_urls_are_off_by_default(media_root):
    refused(f"file://{media_root}/sub/ok.png", "file:// image URLs are disabled")


def test_file_urls_under_the_allowed_path(media_root):
    config = MediaConfig(allowed_local_media_path=str(media_root))
    assert load_image(f"file://{media_root}/sub/ok.png", config, PARAM).size == (40, 30)
    # A link that stays inside the directory is fine; spaces and escapes in the URL are decoded.
    assert load_image(f"file://{media_root}/inside-link.png", config, PARAM).size == (40, 30)
    (media_root / "with space.png").write_bytes((media_root / "sub" / "ok.png").read_bytes())
    assert load_image(f"file://{media_root}/with%20space.png", config, PARAM).size == (40, 30)


def test_file_urls_cannot_escape(media_root):
    config = MediaConfig(allowed_local_media_path=str(media_root))
    refused(f"file://{media_root}/../secret.png", "outside the allowed media path", config)
    refused(f"file://{media_root}/sub/../../secret.png", "outside the allowed media path", config)
    refused(f"file://{media_root}/escape.png", "outside the allowed media path", config)  # symlink out
    refused(f"file://{media_root}/up/secret.png", "outside the allowed media path", config)  # dir link out
    refused(f"file://{media_root}/missing.png", "no such file", config)
    refused(f"file://{media_root}/sub", "not a regular file", config)
    refused(f"file://otherhost{media_root}/sub/ok.png", "remote host", config)
    refused("file:///etc/passwd", "outside the allowed media path", config)


# ---- http(s) -----------------------------------------------------------------------------------------


def test_http_is_refused_unless_domains_are_allowed():
    refused("http://example.com/a.png", "http\\(s\\) image URLs are disabled")
    refused(
        "https://example.com/a.png",
        "not in --allowed-media-domains",
        MediaConfig(allowed_media_domains=("img.example.org",)),
    )


@pytest.mark.parametrize(
    "host", ["169.254.169.254", "127.0.0.1", "localhost", "10.1.2.3", "192.168.0.1", "[::1]", "0.0.0.0"]
)
def test_http_never_reaches_internal_addresses(host):
    """Even when the operator lists the host, an address that is not public is refused before connecting."""
    name = host.strip("[]")
    config = MediaConfig(allowed_media_domains=(name,))
    refused(f"http://{host}/latest/meta-data/", "non-public address", config)


def test_address_policy():
    public = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"]
    internal = [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "::ffff:169.254.169.254",
    ]
    assert all(address_is_public(a) for a in public)
    assert not any(address_is_public(a) for a in internal)
