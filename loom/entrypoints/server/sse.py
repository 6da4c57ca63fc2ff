"""Server-sent events: framing, in-band errors after the headers went out, and a response that always
closes its source and releases its lease."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from loom.entrypoints.server.errors import ClientDisconnected, describe
from loom.entrypoints.server.serving import Lease


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def sse_events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Frame chunks as server-sent events, ending with [DONE]; an error after the headers went out
    becomes one `data: {"error": ...}` event (the status line can no longer change)."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except ClientDisconnected:
        return
    except Exception as e:  # noqa: BLE001 - reported to the client in-band
        yield sse(describe(e)[1])
    yield "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """A streaming response that closes its event source and releases its lease (if it holds one: an
    answer replayed from the response cache does not) however it ends (finished, client gone, server
    shutting down), even if the stream never started."""

    def __init__(
        self, events: AsyncIterator[str], lease: Lease | None, headers: dict[str, str] | None = None
    ):
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **(headers or {})}
        )
        self._events = events
        self._lease = lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            if self._lease is not None:
                self._lease.release()
