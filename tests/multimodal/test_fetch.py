"""http(s) image fetching against a real HTTP server on loopback.

Loopback is exactly what the fetcher refuses, so these tests replace ONE function, the address policy
(`resolve_public`, itself covered in test_media.py), with one that resolves the test's host name to the
server's loopback address; the HTTP client, limits and redirect handling run for real.
"""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from loom.errors import InvalidRequest
from loom.multimodal import MediaConfig, load_image
from loom.multimodal import fetch as fetch_module

PARAM = "messages[0].content[1].image_url"
HOST = "images.test"


def png_bytes(w: int = 32, h: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    seen_hosts: list[str] = []

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        Handler.seen_hosts.append(self.headers.get("Host"))
        if self.path == "/ok.png":
            body = png_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        elif self.path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif self.path == "/big-undeclared":
            self.send_response(200)
            self.end_headers()  # HTTP/1.0: the body runs until the connection closes
            for _ in range(64):
                self.wfile.write(b"\0" * 4096)
        elif self.path == "/slow":
            self.send_response(200)
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"\0" * 16)
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture
def server(monkeypatch):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(fetch_module, "resolve_public", lambda host, port, param: ["127.0.0.1"])
    Handler.seen_hosts = []
    yield f"http://{HOST}:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def config(**kwargs) -> MediaConfig:
    return MediaConfig(allowed_media_domains=(HOST,), **kwargs)


def refused(url: str, match: str, cfg: MediaConfig) -> None:
    with pytest.raises(InvalidRequest, match=match) as err:
        load_image(url, cfg, PARAM)
    assert err.value.param == PARAM


def test_fetches_from_an_allowed_domain(server):
    loaded = load_image(f"{server}/ok.png", config(), PARAM)
    assert loaded.size == (32, 24)
    # The connection went to the checked address, with the URL's own name in the Host header.
    assert Handler.seen_hosts == [server.removeprefix("http://")]


def test_redirects_are_not_followed(server):
    refused(f"{server}/redirect", "redirect", config())


def test_limits(server):
    refused(f"{server}/missing.png", "HTTP 404", config())
    refused(f"{server}/big-declared", "over the limit", config(max_image_bytes=100_000))
    refused(f"{server}/big-undeclared", "over the limit", config(max_image_bytes=100_000))
    refused(f"{server}/slow", "took too long", config(fetch_timeout_s=0.5))
