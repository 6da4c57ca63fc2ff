"""Events of a run as it happens: node started/finished/failed/retrying/skipped, tokens, tool calls."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

EVENT_KINDS = (
    "run_started",
    "node_started",
    "node_retrying",
    "node_finished",
    "node_failed",
    "node_skipped",
    "node_cancelled",
    "token",
    "tool_call",
    "run_finished",
)


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened in a run; `time` is seconds since the run started (monotonic)."""

    kind: str
    time: float
    node: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


EventCallback = Callable[[Event], None]


class EventLog:
    """Every event of one run, in order; any number of readers iterate it from the start, live."""

    def __init__(self, callback: EventCallback | None = None):
        self.events: list[Event] = []
        self.closed = False
        self._callback = callback
        self._changed = asyncio.Event()

    def emit(self, event: Event) -> None:
        self.events.append(event)
        if self._callback is not None:
            try:
                self._callback(event)
            except Exception:  # a broken progress display must not fail the run
                logger.exception("event callback failed on %s", event.kind)
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def follow(self) -> AsyncIterator[Event]:
        """Yield every event from the first, waiting for new ones until the run ends."""
        i = 0
        while True:
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.closed:
                return
            self._changed.clear()
            await self._changed.wait()
