"""Fetch an image over http(s), only from allowed domains and never from a non-public address.

The host is resolved once and every address it resolves to must be public; the connection then goes to
that checked address (the Host header and TLS SNI/certificate check still use the name), so a DNS answer
that changes between the check and the connection (rebinding) cannot reach an internal service.
Redirects are not followed: a redirect could point anywhere. The body is read in chunks under a byte
limit and one deadline for the whole fetch.
"""

from __future__ import annotations

import ipaddress
import time
from urllib.parse import urlsplit, urlunsplit

import httpx

from loom.errors import InvalidRequest
from loom.multimodal.media import MediaConfig, deadline_left, resolve_public


def fetch_bytes(url: str, config: MediaConfig, param: str) -> bytes:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not config.allowed_media_domains:
        raise InvalidRequest(
            "http(s) image URLs are disabled; send the image as a data: URL, or start the server with "
            "--allowed-media-domains",
            param=param,
        )
    if host not in config.allowed_media_domains:
        raise InvalidRequest(f"image host {host!r} is not in --allowed-media-domains", param=param)
    if parts.username or parts.password:
        raise InvalidRequest("image URLs must not carry credentials", param=param)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidRequest("malformed port in the image URL", param=param) from None
    address = resolve_public(host, port, param)[0]
    literal = f"[{address}]" if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address) else address
    pinned = urlunsplit((parts.scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))

    deadline = time.monotonic() + config.fetch_timeout_s
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/png, image/jpeg, image/webp"}
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    try:
        with (
            httpx.Client(timeout=config.fetch_timeout_s, follow_redirects=False, trust_env=False) as client,
            client.stream("GET", pinned, headers=headers, extensions=extensions) as response,
        ):
            if response.is_redirect:
                raise InvalidRequest(
                    f"image URL answered a redirect ({response.status_code}); not followed", param=param
                )
            if response.status_code != 200:
                raise InvalidRequest(
                    f"fetching the image failed with HTTP {response.status_code}", param=param
                )
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > config.max_image_bytes:
                raise InvalidRequest(
                    f"image is {declared} bytes, over the limit of {config.max_image_bytes}", param=param
                )
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > config.max_image_bytes:
                    raise InvalidRequest(
                        f"image is over the limit of {config.max_image_bytes} bytes", param=param
                    )
                deadline_left(deadline, param)
            return bytes(body)
    except httpx.TimeoutException:
        raise InvalidRequest("fetching the image took too long", param=param) from None
    except httpx.HTTPError as e:
        raise InvalidRequest(f"fetching the image failed: {type(e).__name__}", param=param) from None
