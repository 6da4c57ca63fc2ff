"""Everything durable one server owns, wired together: the state database, the work queue (SQLite or
Redis), files, batches and their runner, agent runs. It talks to the server only through its public
HTTP API (an in-process client over the app) and two read-only counts (requests in flight, accepting)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from loom.agent.builtin_tools import builtin_tools
from loom.agent.runtime import Runtime
from loom.jobs.agent_runs import AgentRuns
from loom.jobs.batch_runner import BatchRunner, LineRunner, Throttle
from loom.jobs.batches import BatchStore
from loom.jobs.db import Database
from loom.jobs.files import FileStore
from loom.jobs.queue import SQLiteQueue, WorkQueue
from loom.paths import cache_dir

logger = logging.getLogger(__name__)

INTERNAL_BASE_URL = "http://127.0.0.1"  # a loopback Host: the edge answers it on keyless servers
"""Base URL of in-process requests (never resolved: the transport calls the app directly)."""


def default_state_dir(host: str, port: int) -> Path:
    """<user cache>/loom/state/<host>_<port>: one server's state, found again when it restarts."""
    return cache_dir("state", f"{host}_{port}")


def make_queue(url: str | None, db: Database) -> WorkQueue:
    if url is None or url == "sqlite":
        return SQLiteQueue(db)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from loom.jobs.redis_queue import RedisQueue

        return RedisQueue(url)
    raise ValueError(f"job_queue must be a redis:// URL or 'sqlite', got {url!r}")


class JobService:
    def __init__(
        self,
        state_dir: Path,
        *,
        queue_url: str | None = None,
        max_bytes: int | None = None,
        consumer: str | None = None,
        throttle: Throttle | None = None,
        priority: int | None = None,
        api_key: str | None = None,
        model: str | None = None,
        tracer: Any = None,
    ):
        self.state_dir = Path(state_dir)
        self.queue_url = queue_url
        self.max_bytes = max_bytes
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.throttle = throttle or Throttle()
        self.priority = priority
        self.api_key = api_key
        self.model = model
        self.tracer = tracer
        self.tools = builtin_tools()
        self.require_ready: Callable[[], Any] = lambda: None
        """Raises (503) while the server cannot run requests (loading, draining); set by the app. A run
        is refused then rather than started into failures that would not be stored."""
        self.db: Database | None = None
        self.client: httpx.AsyncClient | None = None
        self.runner: BatchRunner | None = None
        self._task: asyncio.Task | None = None

    def _runtime(self) -> Runtime:
        from loom.agent.clients import OpenAIClient

        client = OpenAIClient(
            INTERNAL_BASE_URL + "/v1",
            self.api_key or "none",
            self.model,
            http_client=self.client,
            max_retries=0,
            timeout=None,
        )
        return Runtime(client, self.tools, tracer=self.tracer)

    def open(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """Open (or create) the state directory. Done when the server starts, not when its app is made."""
        self.db = Database(self.state_dir / "loom.db", max_bytes=self.max_bytes)
        self.queue = make_queue(self.queue_url, self.db)
        self.files = FileStore(self.db, self.state_dir / "files", max_bytes=self.max_bytes)
        self.batches = BatchStore(self.db, self.files, self.queue)
        self.agent_runs = AgentRuns(self.db, self._runtime, self.tools, stopping)
        logger.info("job state in %s (queue: %s)", self.state_dir, self.queue_url or "sqlite")

    async def start(self, app: Any, admitted: Callable[[], int], accepting: Callable[[], bool]) -> None:
        """Start the batch loop and resume interrupted agent runs (once requests can run)."""
        self.open(stopping=lambda: not accepting())
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=INTERNAL_BASE_URL, timeout=None
        )
        lines = LineRunner(self.client, self.api_key, self.priority)
        self.runner = BatchRunner(
            self.queue, lines, self.consumer, self.throttle, admitted, accepting, batches=self.batches
        )
        self._task = asyncio.get_running_loop().create_task(self._run(accepting), name="loom-jobs")

    async def _run(self, accepting: Callable[[], bool]) -> None:
        while not accepting():  # the model is loading: resumed runs would only get 503s
            await asyncio.sleep(0.1)
        self.agent_runs.resume()
        await self.runner.run()

    async def stop(self) -> None:
        if self.client is None:
            return  # never started
        await self.agent_runs.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.aclose()
        self.queue.close()
        self.db.close()
