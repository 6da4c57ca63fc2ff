"""The server's typed errors and the ONE place any error becomes an HTTP status and an OpenAI error body.

Handlers raise (loom's InvalidRequest, EngineDeadError, the APIError subclasses below, pydantic's
validation errors); `error_response` turns each into `{"error": {"message", "type", "param", "code"}}`
with its status. The edge middleware and the SSE stream use the same function, so a client sees one
format wherever the error happens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loom.errors import (
    ContextLengthExceeded,
    EngineDeadError,
    InvalidRequest,
    LoomError,
    NotFound,
    RequestFailed,
    StorageFull,
)

logger = logging.getLogger(__name__)


class APIError(LoomError):
    """An error that exists only at the HTTP edge; its status comes from `_MAPPING`."""

    def __init__(self, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        """Seconds for the Retry-After header, when the client should simply try again later."""


class HostNotAllowed(APIError):
    """A keyless server got a Host header that is not on its allow-list (400): DNS rebinding."""


class AuthenticationError(APIError):
    """Missing or wrong API key (401)."""


class ModelNotFound(APIError):
    """The request names a model this server does not serve (404)."""


class PayloadTooLarge(APIError):
    """The request body is over --max-body-bytes (413)."""


class TooManyRequests(APIError):
    """Backpressure: too many requests or prompt tokens in flight (429)."""


class ServiceUnavailable(APIError):
    """The model is still loading, failed to load, or the server is draining (503)."""


class ClientDisconnected(APIError):
    """The client went away before the answer was ready; nobody reads the response (499)."""


@dataclass(frozen=True)
class _Status:
    status: int
    type: str
    code: str | None = None


# Most specific classes first: the first isinstance match wins.
_MAPPING: list[tuple[type[BaseException], _Status]] = [
    (ContextLengthExceeded, _Status(400, "invalid_request_error", "context_length_exceeded")),
    (InvalidRequest, _Status(400, "invalid_request_error")),
    (RequestValidationError, _Status(400, "invalid_request_error")),
    (HostNotAllowed, _Status(400, "invalid_request_error", "host_not_allowed")),
    (AuthenticationError, _Status(401, "authentication_error", "invalid_api_key")),
    (ModelNotFound, _Status(404, "invalid_request_error", "model_not_found")),
    (NotFound, _Status(404, "invalid_request_error", "not_found")),
    (PayloadTooLarge, _Status(413, "invalid_request_error", "request_too_large")),
    (TooManyRequests, _Status(429, "rate_limit_error", "rate_limit_exceeded")),
    (ClientDisconnected, _Status(499, "client_closed_request")),
    (ServiceUnavailable, _Status(503, "service_unavailable_error", "service_unavailable")),
    (EngineDeadError, _Status(503, "service_unavailable_error", "engine_dead")),
    # The engine isolated a failure to this request: our fault, reported with what failed.
    (RequestFailed, _Status(500, "internal_server_error")),
    (StorageFull, _Status(507, "server_error", "insufficient_storage")),
]
_INTERNAL = _Status(500, "internal_server_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A readable message and the offending field from pydantic's error list."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON: {detail}".rstrip(": "), None
    for e in errors:
        # A protocol validator that raised our own InvalidRequest already says what and where.
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidRequest):
            return cause.message, cause.param
    parts, param = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if param is None and loc:
            param = loc[0]
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", param


def describe(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(status, OpenAI error body, extra headers) for any exception."""
    status = next((s for cls, s in _MAPPING if isinstance(exc, cls)), None)
    param: str | None = getattr(exc, "param", None)
    headers: dict[str, str] = {}
    if isinstance(exc, RequestValidationError):
        message, param = _validation_message(exc)
    elif isinstance(exc, StarletteHTTPException):
        status = _Status(
            exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error"
        )
        message = str(exc.detail)
        headers.update(exc.headers or {})
    elif status is None:
        # Our bug, not the client's: log the traceback here and keep details out of the response.
        logger.error("unhandled error", exc_info=exc)
        status, message = _INTERNAL, "internal server error"
    else:
        message = getattr(exc, "message", None) or str(exc)
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    body = {
        "error": {"message": _printable(message), "type": status.type, "param": param, "code": status.code}
    }
    return status.status, body, headers


def _printable(message: str) -> str:
    """The message with anything UTF-8 cannot encode (lone surrogates echoed from the input) escaped, so
    that answering an error can never fail in its turn."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = describe(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception a handler raises through `error_response`."""

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    # Exception covers the rest; StarletteHTTPException keeps unknown routes (404) and wrong methods
    # (405) in the OpenAI error format instead of Starlette's {"detail": ...}.
    for cls in (LoomError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(cls, handle)
