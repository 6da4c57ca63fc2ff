"""The OpenAPI document says what the server really answers, so schema-driven clients and fuzzers
(tests/entrypoints/server/test_openapi.py runs schemathesis against it) agree with the server.

Every route may answer 400 (a Host not allowed, a malformed Content-Length), 413 (body over the
limit) and 500, and 401 when the server has an API key (except /health); routes list the rest
themselves. FastAPI's 422 is never sent (validation errors are 400s), so it is taken out.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from loom.entrypoints.server import protocol as p

_WHY = {
    400: "Invalid request: the message names the field (`param`); also a Host header not allowed.",
    401: "Missing or wrong API key.",
    404: "The model is not served here, or the named file, batch or agent run does not exist.",
    413: "The request body is over --max-body-bytes.",
    429: "Overloaded: too many sequences or prompt tokens in flight; retry after Retry-After seconds.",
    500: "A bug in the server (details are in its log, not here).",
    503: "The model is loading or failed to load, the engine stopped, or the server is shutting down.",
    507: "The durable job state could not be written: the disk or --state-max-bytes is full.",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
}
EVERY_ROUTE = (400, 413, 500)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` entry of a route that may also answer these statuses (beyond EVERY_ROUTE)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted({*statuses, *EVERY_ROUTE}):
        out[status] = {"model": p.ErrorResponse, "description": _WHY[status]}
        if status in (429, 503):
            out[status]["headers"] = _RETRY_AFTER
    return out


def non_json(media_type: str, description: str, *statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route whose 200 is not JSON (a file download, an event stream), plus its error statuses."""
    return {
        **errors(*statuses),
        200: {"description": description, "content": {media_type: {"schema": {"type": "string"}}}},
    }


def streamed(description: str) -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON, or server-sent events when the request asks for `stream`."""
    return {
        200: {
            "description": description,
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "string",
                        "description": "With stream: true, `data: <chunk JSON>` events, then `data: [DONE]`; "
                        'an error after the first event is one `data: {"error": ...}` event before [DONE].',
                    }
                }
            },
        }
    }


def install_openapi(app: FastAPI, model_name: str, api_key: bool, open_paths: frozenset[str]) -> None:
    """Make `app.openapi()` return the corrected document (built once). Requests may name only the
    served model (another name is a 404), which also lets fuzzers reach past the model check."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, operations in doc.get("paths", {}).items():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
                    if api_key and path not in open_paths:
                        operation["security"] = [{"bearer": []}]
                        operation["responses"]["401"] = {
                            "description": _WHY[401],
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                            },
                        }
            schemas = doc.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            for request in ("ChatCompletionRequest", "CompletionRequest"):
                schemas[request]["properties"]["model"] = {
                    "anyOf": [{"type": "string", "enum": [model_name]}, {"type": "null"}],
                    "description": "The served model (GET /v1/models); null or absent means it too.",
                }
            if api_key:
                doc.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}
                }
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
