"""Fixtures of the agent tests: one in-process engine per module, on its own event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from loom.agent.clients import EngineClient
from loom.config import EngineConfig


class LoopThread:
    """An event loop on a background thread, so one engine serves every test of a module."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def engine_client(tiny_llama_dir: Path) -> Iterator[tuple[LoopThread, EngineClient]]:
    """(loop thread, EngineClient on the tiny llama); run coroutines with `loop.run(coro)`."""
    loop = LoopThread()
    context = EngineClient.launch(EngineConfig(model=str(tiny_llama_dir), num_blocks=512))
    client = loop.run(context.__aenter__())
    try:
        yield loop, client
    finally:
        loop.run(context.__aexit__(None, None, None))
        loop.close()
