"""The edge guard: ASGI middleware that runs before routing and answers what no handler should see.

In order: the Host header (without an API key, only allowed hosts: DNS rebinding), the API key (401),
the body size (413); then the app, with any exception no handler took answered as a 500 here.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loom.entrypoints.server.errors import (
    AuthenticationError,
    HostNotAllowed,
    PayloadTooLarge,
    error_response,
)
from loom.entrypoints.server.files import FILES_PATH
from loom.errors import InvalidRequest

logger = logging.getLogger(__name__)

# Liveness probes must work without credentials and while the model loads.
OPEN_PATHS = frozenset({"/health"})


class HostAllowList:
    """Which Host headers a server without an API key answers.

    A web page can point a name it controls at 127.0.0.1 (DNS rebinding) and then drive a local server
    from the victim's browser as if same-origin; the browser still sends that name as Host. So only
    names that cannot be rebound are allowed by default: `localhost` and `*.localhost` (browsers
    resolve them to loopback themselves), any IP address (a page whose origin is an IP address reached
    us by that address, no DNS involved), and the name the server was told to bind to. `names` adds
    more; an entry starting with "." also allows its subdomains. The port is not part of the check.
    """

    def __init__(self, names: tuple[str, ...] = (), bind_host: str | None = None):
        entries = {n.lower().rstrip(".") for n in (*names, bind_host or "") if n}
        self.names = frozenset(e for e in entries if not e.startswith("."))
        self.suffixes = tuple(sorted(e for e in entries if e.startswith(".")))

    def allows(self, host_header: str | None) -> bool:
        if host_header is None:  # HTTP/1.0 may omit Host; a browser never does
            return True
        name = host_name(host_header)
        if name is None:
            return False
        if name == "localhost" or name.endswith(".localhost") or name in self.names:
            return True
        if any(name.endswith(s) for s in self.suffixes):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


def host_name(host_header: str) -> str | None:
    """The host of a Host header, lowercased, without port, brackets or a trailing dot; None if
    malformed. "[::1]:8000" -> "::1", "LocalHost.:8000" -> "localhost"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1 :] if end != -1 else ""
        if end == -1 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return host[1:end] or None
    name, sep, port = host.rpartition(":")
    if not sep:
        name = host
    elif not port.isdigit() or ":" in name:  # a bare IPv6 address (no brackets) is not a valid Host
        return None
    return name.rstrip(".") or None


class EdgeGuard:
    """ASGI middleware run before routing: Host (400), API key (401), then body size (413).

    The body is read here, up to the limit, and replayed to the app, so an oversized body is refused
    whether or not it announced its size (chunked uploads have no Content-Length).
    """

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        max_body_bytes: int,
        hosts: HostAllowList | None = None,
        max_file_bytes: int | None = None,
    ):
        self.app = app
        self.api_key = api_key.encode() if api_key is not None else None
        self.max_body_bytes = max_body_bytes
        self.max_file_bytes = max_file_bytes if max_file_bytes is not None else max_body_bytes
        """The body limit of a file upload (POST /v1/files), which may be larger than a request's."""
        # With a key, a rebinding page cannot authenticate, so the Host check is only for keyless servers.
        self.hosts = hosts if api_key is None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_host(scope)
            self._check_key(scope)
            receive = await self._read_body(scope, receive)
        except (HostNotAllowed, AuthenticationError, PayloadTooLarge, InvalidRequest) as e:
            await error_response(e)(scope, receive, send)
            return
        await self._answer_errors(scope, receive, send)

    def _check_host(self, scope: Scope) -> None:
        if self.hosts is None:
            return
        raw = dict(scope["headers"]).get(b"host")
        host = raw.decode("latin-1") if raw is not None else None
        if not self.hosts.allows(host):
            raise HostNotAllowed(
                f"the Host {host!r} is not allowed: this server has no API key and answers only loopback "
                "names, IP addresses and the names given by --allowed-hosts"
            )

    def _check_key(self, scope: Scope) -> None:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        # compare_digest: the time taken must not tell how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("latin-1"), self.api_key
        ):
            raise AuthenticationError("missing or invalid API key (send 'Authorization: Bearer <key>')")

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive:
        upload = scope["path"] == FILES_PATH and scope["method"] == "POST"
        limit = self.max_file_bytes if upload else self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise InvalidRequest("Content-Length is not an integer") from None
            if size > limit:
                raise PayloadTooLarge(f"the request body is {size} bytes; the limit is {limit}")
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body: let the app see it
                first: Message = message
                break
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > limit:
                raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        return replay

    async def _answer_errors(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; an exception no handler took becomes a 500 in the OpenAI format, here.

        Starlette's ServerErrorMiddleware would answer too, but then re-raise, and uvicorn closes a
        connection whose app raised: the client's next request on that keep-alive connection would
        fail. Answered here, the exception stops here and the connection stays usable.
        """
        started = ended = False

        async def tracked(message: Message) -> None:
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:  # noqa: BLE001 - answered (and logged) as a 500
            if not started:
                await error_response(e)(scope, receive, send)
            elif ended:
                logger.error("error after the response was sent", exc_info=e)
            else:
                raise  # a half-sent body cannot be completed: let the server close the connection
