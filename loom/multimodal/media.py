"""Load an image named by a URL: `data:` (always), `file://` (only under an allowed directory) and
http(s) (only from allowed domains, never from a private, loopback or link-local address).

Every refusal is an `InvalidRequest` whose `param` is the request field the URL came from, raised before
anything large is decoded: a data URL's size is checked before base64 decoding, an image's declared
width x height before its pixels are (a 100k x 100k PNG is a few hundred bytes on the wire and 30 GB
decoded). Loading is blocking I/O: the frontend runs it off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import os
import socket
import stat
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

from loom.errors import InvalidRequest

FORMATS = ("PNG", "JPEG", "WEBP")
"""The formats Pillow may decode here; nothing else is even tried (no TIFF, PSD, ... parsers)."""


@dataclass(frozen=True)
class MediaConfig:
    """Where images may come from, and how big they may be."""

    allowed_local_media_path: str | None = None
    """Directory `file://` image URLs may read from (symlinks and `..` cannot leave it); None refuses every `file://` URL."""
    allowed_media_domains: tuple[str, ...] = ()
    """Host names http(s) image URLs may be fetched from (exact match); empty refuses every http(s) URL."""
    max_image_bytes: int = 20 * 2**20
    """Largest encoded image accepted, from any source (a data URL's base64 text counts 3/4 of its length)."""
    max_image_pixels: int = 40_000_000
    """Largest width x height an image may declare; checked from its header before any pixel is decoded."""
    fetch_timeout_s: float = 10.0
    """Deadline for fetching one http(s) image, connection and body together."""

    def __post_init__(self) -> None:
        for name in ("max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be >= 1, got {getattr(self, name)}", param=name)
        if self.fetch_timeout_s <= 0:
            raise InvalidRequest(
                f"fetch_timeout_s must be > 0, got {self.fetch_timeout_s}", param="fetch_timeout_s"
            )
        object.__setattr__(
            self, "allowed_media_domains", tuple(d.lower() for d in self.allowed_media_domains)
        )


@dataclass(frozen=True)
class LoadedImage:
    """A decoded RGB image and the hash of its pixels."""

    image: Image.Image = field(repr=False)
    content_hash: str
    """sha256 of the decoded RGB pixels and size: equal for the same picture sent as PNG or lossless WebP,
    different for any other picture (the key of the encoder cache and of prefix-cache block hashes)."""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.image.size


def load_image(url: str, config: MediaConfig, param: str) -> LoadedImage:
    """Load and decode the image at `url` (see the module docstring). Errors name `param`."""
    if not isinstance(url, str) or not url:
        raise InvalidRequest("the image URL must be a non-empty string", param=param)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url_bytes(url, config, param)
    elif scheme == "file":
        data = _local_file_bytes(url, config, param)
    elif scheme in ("http", "https"):
        from loom.multimodal.fetch import fetch_bytes

        data = fetch_bytes(url, config, param)
    else:
        raise InvalidRequest(
            f"unsupported image URL scheme {scheme or url[:16]!r}: send a data: URL "
            "(data:image/png;base64,...), a file:// path under --allowed-local-media-path, "
            "or an http(s) URL from --allowed-media-domains",
            param=param,
        )
    return decode_image(data, config, param)


def decode_image(data: bytes, config: MediaConfig, param: str) -> LoadedImage:
    """Decode PNG / JPEG / WebP bytes to RGB, refusing anything else and oversized images."""
    if len(data) > config.max_image_bytes:
        raise InvalidRequest(
            f"image is {len(data)} bytes, over the limit of {config.max_image_bytes}", param=param
        )
    try:
        # Pillow's own bomb check (a global, MAX_IMAGE_PIXELS) only warns below twice its limit; ours is
        # below it and comes from the config, so its warning is noise and its error is caught below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise InvalidRequest(f"image declares too many pixels: {e}", param=param) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidRequest(
            f"the bytes are not a PNG, JPEG or WebP image ({len(data)} bytes, starting {data[:8]!r})",
            param=param,
        ) from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > config.max_image_pixels:
        raise InvalidRequest(
            f"image declares {width}x{height} pixels, over the limit of {config.max_image_pixels} "
            "(refused before decoding)",
            param=param,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            # As transformers' load_image does: honour the EXIF orientation, then drop alpha.
            image = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InvalidRequest(f"the image could not be decoded: {e}", param=param) from None
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return LoadedImage(image, digest.hexdigest())


def _data_url_bytes(url: str, config: MediaConfig, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise InvalidRequest("malformed data URL: no ',' after the media type", param=param)
    meta = header[len("data:") :].split(";")
    media_type = meta[0].strip().lower()
    if "base64" not in (m.strip().lower() for m in meta[1:]):
        raise InvalidRequest(
            "image data URLs must be base64-encoded (data:image/png;base64,...)", param=param
        )
    if media_type and not media_type.startswith("image/"):
        raise InvalidRequest(f"data URL media type {media_type!r} is not an image", param=param)
    # Check the size before decoding: base64 is 4 characters per 3 bytes.
    if len(payload) * 3 // 4 > config.max_image_bytes + 3:
        raise InvalidRequest(
            f"image data URL is about {len(payload) * 3 // 4} bytes, over the limit of {config.max_image_bytes}",
            param=param,
        )
    payload = "".join(payload.split())  # some clients wrap the text at 76 columns
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("malformed base64 in the image data URL", param=param) from None


def _local_file_bytes(url: str, config: MediaConfig, param: str) -> bytes:
    if config.allowed_local_media_path is None:
        raise InvalidRequest(
            "file:// image URLs are disabled; the server allows them under --allowed-local-media-path",
            param=param,
        )
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise InvalidRequest(f"file:// URL names a remote host {parts.netloc!r}", param=param)
    root = Path(config.allowed_local_media_path).resolve()
    # resolve() follows every symlink and folds `..`, so the containment check sees the real target.
    try:
        path = Path(unquote(parts.path)).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise InvalidRequest(
            f"no such file under the allowed media path: {unquote(parts.path)}", param=param
        ) from None
    if not path.is_relative_to(root):
        raise InvalidRequest(f"{unquote(parts.path)} is outside the allowed media path", param=param)
    # O_NOFOLLOW: a file swapped for a symlink after the check above is refused rather than followed.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise InvalidRequest(f"cannot read {unquote(parts.path)}: {e.strerror}", param=param) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidRequest(f"{unquote(parts.path)} is not a regular file", param=param)
        if info.st_size > config.max_image_bytes:
            raise InvalidRequest(
                f"image file is {info.st_size} bytes, over the limit of {config.max_image_bytes}", param=param
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(config.max_image_bytes + 1)
    finally:
        os.close(fd)


def address_is_public(address: str) -> bool:
    """Whether an IP address is globally routable: not private, loopback, link-local (169.254.0.0/16, the
    cloud metadata service), multicast, reserved or unspecified, including through IPv4-mapped IPv6."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve_public(host: str, port: int, param: str) -> list[str]:
    """Every address `host` resolves to; refuses the host unless all of them are public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InvalidRequest(f"cannot resolve image host {host!r}", param=param) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    bad = [a for a in addresses if not address_is_public(a)]
    if bad or not addresses:
        raise InvalidRequest(
            f"image host {host!r} resolves to a non-public address ({', '.join(bad)}); refused", param=param
        )
    return addresses


def deadline_left(deadline: float, param: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise InvalidRequest("fetching the image took too long", param=param)
    return left
