"""The HTTP ingress of a scaled-out loom: picks the model version (canary split), hands the router what
it needs (program id, prompt block hashes, replicas to avoid), forwards the request to a replica, and
retries it elsewhere when it failed before its first token.

Once a token has reached the client the status line is sent and the answer cannot move: a replica that
dies then ends the stream with one OpenAI-style error event and [DONE], never a hang.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from loom.entrypoints.server.errors import AuthenticationError, ServiceUnavailable, describe
from loom.errors import InvalidRequest
from loom.serving.breaker import CircuitBreaker
from loom.serving.canary import CanaryController
from loom.serving.config import ScaleOutConfig
from loom.serving.metrics import RouterMetrics
from loom.serving.policy import RouteInfo
from loom.serving.prefix import block_hashes, request_text
from loom.serving.replica import ResponseStart

logger = logging.getLogger(__name__)

VERSION_HEADER = "x-loom-model-version"
REPLICA_HEADER = "x-loom-replica"
ROUTE_HEADER = "x-loom-route"  # why the router chose that replica (policy.REASONS)
SESSION_HEADER = "x-loom-session"
_MAX_BACKOFF_S = 2.0
# Response headers the ingress sets itself (lengths change when it re-frames the body).
_HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}


class RetryableFailure(Exception):
    """An attempt failed before anything reached the client; another replica may serve it."""

    def __init__(self, message: str, replica: str | None):
        super().__init__(message)
        self.replica = replica


class LoomIngress:
    """The Ray Serve deployment class of the ingress (wrapped by `serve.deployment` in app.py)."""

    def __init__(self, config: ScaleOutConfig, api_key: str | None, **handles):
        self.config = config
        self.api_key = api_key.encode() if api_key else None
        self.handles = {version: h.options(stream=True) for version, h in handles.items()}
        self.canary = CanaryController(
            config.model_version,
            config.canary_version if config.canary else None,
            weight=config.canary_weight,
            step=config.canary_step,
            step_interval_s=config.canary_step_interval_s,
            window_s=config.rollback_window_s,
            min_requests=config.rollback_min_requests,
            error_margin=config.rollback_error_margin,
            ttft_margin=config.rollback_ttft_margin,
        )
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s)
        self.metrics = RouterMetrics(self.canary, self.breaker)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path == "/health":
            return JSONResponse({"status": "ok"})
        try:
            if path == "/metrics":
                self._check_key(request)
                return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)
            if path == "/v1/router/status":
                self._check_key(request)
                return JSONResponse(self.status())
            return await self.forward(request)
        except Exception as e:  # noqa: BLE001 - every failure becomes one OpenAI-style answer
            status, body, headers = describe(e)
            return JSONResponse(body, status_code=status, headers=headers)

    def status(self) -> dict:
        """The canary's state and each version's window (also what tests poll)."""
        return {
            "versions": list(self.canary.versions),
            "canary_state": self.canary.state,
            "canary_weight": self.canary.weight,
            "rollback_reason": self.canary.reason,
            "windows": {v: _window_json(self.canary.window(v)) for v in self.canary.versions},
        }

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
            raise AuthenticationError("missing or invalid API key (send 'Authorization: Bearer <key>')")

    # ---- forwarding with retries ---------------------------------------------------------------

    async def forward(self, request: Request) -> Response:
        arrived = time.perf_counter()
        body = await request.body()
        fields = _json_fields(body)
        version = self._version(request, fields)
        program_id = fields.get("program_id") if isinstance(fields.get("program_id"), str) else None
        hashes: tuple[int, ...] = ()
        if request.method == "POST" and ("messages" in fields or "prompt" in fields):
            hashes = block_hashes(request_text(fields), self.config.prefix_block_chars)
        streaming = fields.get("stream") is True
        headers = [(k, v) for k, v in request.scope["headers"] if k != b"host"]
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        request_id = uuid.uuid4().hex
        self.metrics.overhead.observe(time.perf_counter() - arrived)

        tried: list[str] = []
        attempt = 0
        while True:
            route = RouteInfo(request_id, program_id, hashes, attempt, self.breaker.blocked() + tuple(tried))
            stream = self.handles[version].handle.remote(route, request.method, path, headers, body)
            try:
                start, held = await self._first_token(stream, streaming)
            except RetryableFailure as failure:
                self.metrics.attempt_failed(version)
                if failure.replica is not None:
                    self.breaker.record(failure.replica, ok=False)
                    tried.append(failure.replica)
                self.canary.record(version, error=True, ttft_s=None)
                if attempt >= self.config.max_retries:
                    logger.warning("request %s failed after %d tries: %s", request_id, attempt + 1, failure)
                    self.metrics.finished(version, 503, None)
                    error = ServiceUnavailable(
                        f"no replica could serve the request after {attempt + 1} tries: {failure}",
                        retry_after=1,
                    )
                    status, body, extra = describe(error)
                    return JSONResponse(body, status_code=status, headers={**extra, VERSION_HEADER: version})
                version = self.canary.other(version) or version
                await asyncio.sleep(min(_MAX_BACKOFF_S, self.config.retry_backoff_s * 2**attempt))
                attempt += 1
                continue
            self.breaker.record(start.replica, ok=True)
            self.metrics.routed(route.reason or "unknown")
            break

        out_headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in start.headers
            if k.lower() not in _HOP_HEADERS
        }
        out_headers[VERSION_HEADER] = start.version
        out_headers[REPLICA_HEADER] = start.replica
        out_headers[ROUTE_HEADER] = route.reason or "unknown"
        if not streaming or not _is_sse(start):
            self._finish(start, time.perf_counter() - arrived if streaming else None)
            return Response(b"".join(held), status_code=start.status, headers=out_headers)
        ttft = time.perf_counter() - arrived
        return StreamingResponse(
            self._relay(stream, held, start, ttft), status_code=start.status, headers=out_headers
        )

    def _version(self, request: Request, fields: dict) -> str:
        pinned = request.headers.get(VERSION_HEADER)
        if pinned is not None:
            if pinned not in self.canary.versions:
                raise InvalidRequest(
                    f"unknown model version {pinned!r}; this deployment serves {list(self.canary.versions)}",
                    param=VERSION_HEADER,
                )
            return pinned
        sticky = fields.get("program_id") or request.headers.get(SESSION_HEADER) or fields.get("user")
        return self.canary.pick(sticky if isinstance(sticky, str) else None)

    async def _first_token(self, stream, streaming: bool) -> tuple[ResponseStart, list[bytes]]:
        """Read the answer up to its first token (a whole answer when not streaming), holding it back:
        until then a failure is retryable. Raises RetryableFailure."""
        start: ResponseStart | None = None
        held: list[bytes] = []
        try:
            async for item in stream:
                if isinstance(item, ResponseStart):
                    start = item
                    if start.status >= 500:
                        # Engine dead, draining, still loading: not this replica's to answer now.
                        raise RetryableFailure(f"replica answered {start.status}", start.replica)
                    continue
                held.append(item)
                # An SSE stream is held until its first token; anything else (an answer, a 4xx) whole.
                if streaming and start is not None and _is_sse(start):
                    event = _first_token_event(b"".join(held))
                    if event == "error":
                        raise RetryableFailure("the stream failed before its first token", start.replica)
                    if event == "token":
                        return start, held
        except RetryableFailure:
            await _close(stream)
            raise
        except Exception as e:  # noqa: BLE001 - the replica died or the call failed: try another
            await _close(stream)
            raise RetryableFailure(f"{type(e).__name__}: {e}", start.replica if start else None) from e
        if start is None:
            raise RetryableFailure("the replica closed the stream without answering", None)
        return start, held

    async def _relay(
        self, stream, held: list[bytes], start: ResponseStart, ttft: float
    ) -> AsyncIterator[bytes]:
        """The rest of a stream after its first token; a failure now ends it with an error event."""
        error = False
        try:
            for chunk in held:
                yield chunk
            async for item in stream:
                yield item
        except Exception as e:  # noqa: BLE001 - reported in-band: the status line is already sent
            error = True
            logger.warning("replica %s failed mid-stream: %s", start.replica, e)
            self.breaker.record(start.replica, ok=False)
            failure = ServiceUnavailable(f"the replica serving this stream failed: {type(e).__name__}")
            yield f"data: {json.dumps(describe(failure)[1])}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            await _close(stream)
            self.metrics.finished(start.version, 503 if error else start.status, ttft)
            self.canary.record(start.version, error=error, ttft_s=None if error else ttft)

    def _finish(self, start: ResponseStart, ttft: float | None) -> None:
        self.metrics.finished(start.version, start.status, ttft)
        self.canary.record(start.version, error=start.status >= 500, ttft_s=ttft)


def _window_json(window) -> dict:
    return {"requests": window.requests, "errors": window.errors, "ttft_p95": window.ttft_p95}


def _json_fields(body: bytes) -> dict:
    """The request's JSON object, or {} (a malformed body is forwarded as is: the replica's 400 says why)."""
    try:
        fields = json.loads(body) if body else {}
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


def _is_sse(start: ResponseStart) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start.headers)


def _first_token_event(data: bytes) -> str | None:
    """ "token" once the held SSE events include one carrying output (content, text, a tool call, a
    finish reason or usage), "error" if one is an error event, else None (only the role preamble so far)."""
    for line in data.split(b"\n"):
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            return "token"
        try:
            event = json.loads(payload)
        except ValueError:
            return None  # a partial event: wait for the rest
        if "error" in event:
            return "error"
        if event.get("usage"):
            return "token"
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            if (
                choice.get("text")
                or delta.get("content")
                or delta.get("tool_calls")
                or choice.get("finish_reason")
            ):
                return "token"
    return None


async def _close(stream) -> None:
    try:
        stream.cancel()
    except Exception:  # noqa: BLE001 - already finished or already gone
        pass
