"""Runs batch lines below interactive traffic, through the server's own public API, in-process.

Each line is an HTTP request to the server's app over an in-process ASGI transport: it gets exactly the
validation, defaults and response body that the same request sent by a client gets (so a greedy batch
line answers what the request answers alone). The throttle sits above the engine: a few lines at most
run at once, none start while interactive requests are in flight or were seen within `idle_s`, and every
line carries a low scheduling `priority` (which the engine honours under --scheduling-policy priority).

Lines already running when an interactive request arrives are preempted (`preempt`): aborted, so the
interactive request has the engine to itself, and put back in the queue. Their prompts' KV stays in
the prefix cache, so running them again later mostly costs their decode. Without preemption an
interactive request shares every step with the running lines, and on a CPU its time to first token
roughly doubled (benchmarks/batch_interference.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from loom.jobs.batches import BatchStore
from loom.jobs.queue import Task, WorkQueue

logger = logging.getLogger(__name__)

RETRY_STATUSES = (429, 503)
"""The server is busy, loading or draining: the line goes back to the queue and runs later."""


def _invalid(message: str, param: str | None = None) -> dict[str, Any]:
    return {
        "ok": False,
        "status_code": None,
        "error": {"code": "invalid_request", "message": message, "param": param},
    }


class LineRunner:
    """Sends one batch line to the app and turns the answer into a result (None: retry later)."""

    def __init__(self, client: httpx.AsyncClient, api_key: str | None = None, priority: int | None = None):
        self.client = client
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.priority = priority

    async def run(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        line, endpoint = payload["line"], payload["endpoint"]
        method = line.get("method", "POST")
        if not isinstance(method, str) or method.upper() != "POST":
            return _invalid(f"method must be POST, got {method!r}", "method")
        if line.get("url") != endpoint:
            return _invalid(f"url must be the batch's endpoint {endpoint!r}, got {line.get('url')!r}", "url")
        body = line.get("body")
        if not isinstance(body, dict):
            return _invalid("body must be a JSON object (the request)", "body")
        if body.get("stream"):
            return _invalid("stream is not supported in a batch", "body.stream")
        if self.priority is not None and "priority" not in body:
            body = {**body, "priority": self.priority}
        response = await self.client.post(endpoint, json=body, headers=self.headers)
        if response.status_code in RETRY_STATUSES:
            return None
        try:
            data = response.json()
        except ValueError:
            data = {"error": {"message": response.text[:1000], "type": "server_error"}}
        ok = 200 <= response.status_code < 300
        return {
            "ok": ok,
            "status_code": response.status_code,
            "request_id": data.get("id") if ok and isinstance(data, dict) else None,
            "body": data,
            "error": None,
        }


@dataclass
class Throttle:
    """How much batch work may run beside interactive traffic."""

    max_concurrency: int = 4
    """Most batch lines in flight when no interactive request is."""
    idle_s: float = 1.0
    """Seconds without interactive requests before new batch lines start."""
    preempt: bool = True
    """Abort running lines when an interactive request arrives (they run again later)."""


def admitted_weight(payload: dict[str, Any]) -> int:
    """How many prompts the server admits for this line (a completions request may hold several)."""
    body = payload["line"].get("body")
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


class BatchRunner:
    """The loop that claims lines from the queue, runs them, records results and finalizes batches.

    `admitted()` is the server's count of requests in flight (interactive and batch); the runner
    subtracts its own to see interactive load. `accepting()` says whether requests can run now (model
    loaded, not draining).
    """

    def __init__(
        self,
        queue: WorkQueue,
        lines: LineRunner,
        consumer: str,
        throttle: Throttle,
        admitted: Callable[[], int],
        accepting: Callable[[], bool],
        batches: BatchStore | None = None,
        poll_s: float = 0.02,
        tick_s: float = 0.5,
    ):
        self.queue = queue
        self.lines = lines
        self.consumer = consumer
        self.throttle = throttle
        self.admitted = admitted
        self.accepting = accepting
        self.batches = batches
        self.poll_s = poll_s
        self.tick_s = tick_s
        self.in_flight: dict[str, Task] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._preempted: set[str] = set()
        self.num_preempted = 0
        self._changed = asyncio.Event()
        self._last_interactive = float("-inf")
        self._retry_at = 0.0
        self.num_finished = 0

    def interactive_load(self) -> int:
        ours = sum(admitted_weight(t.payload) for t in self.in_flight.values())
        return max(0, self.admitted() - ours)

    def room(self, now: float) -> int:
        """How many more lines may start now."""
        if self.interactive_load() > 0:
            self._last_interactive = now
        if now - self._last_interactive < self.throttle.idle_s or now < self._retry_at:
            return 0
        return max(0, self.throttle.max_concurrency - len(self.in_flight))

    async def run(self) -> None:
        """Until cancelled. Lines still running when it is cancelled stay claimed, and are handed out
        again at the next start."""
        if self.batches is not None:
            self.batches.resume()
        last_tick = 0.0
        idle_until = 0.0
        try:
            while True:
                now = time.monotonic()
                if self.batches is not None and now - last_tick >= self.tick_s:
                    last_tick = now
                    self._guard(self.batches.tick, {t.group for t in self.in_flight.values()})
                if self.throttle.preempt and self.in_flight and self.interactive_load() > 0:
                    self._preempt_all()
                if self.accepting() and now >= idle_until:
                    room = self.room(now)
                    if room > 0:
                        claimed = self._guard(self.queue.claim, self.consumer, room) or []
                        for task in claimed:
                            self._start(task)
                        if not claimed:  # nothing queued: look again in a while, not every poll
                            idle_until = now + self.tick_s
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), self.poll_s)
                except TimeoutError:
                    pass
        finally:
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def _preempt_all(self) -> None:
        for task_id, job in self._tasks.items():
            if task_id not in self._preempted:
                self._preempted.add(task_id)
                self.num_preempted += 1
                job.cancel()

    def _guard(self, fn, *args):
        """A failing store (a full disk) must not end the loop: log, and try again on the next round."""
        try:
            return fn(*args)
        except Exception:
            logger.exception("batch runner: %s failed", getattr(fn, "__name__", fn))
            return None

    def _start(self, task: Task) -> None:
        self.in_flight[task.id] = task
        job = asyncio.get_running_loop().create_task(self._line(task), name=f"batch-line:{task.id}")
        self._tasks[task.id] = job
        job.add_done_callback(lambda _: self._tasks.pop(task.id, None))

    async def _line(self, task: Task) -> None:
        try:
            try:
                result = await self.lines.run(task.payload)
            except asyncio.CancelledError:
                if task.id not in self._preempted:
                    raise  # shutting down: the claim stays, and the next start takes it back
                result = None  # preempted: back to the queue (the request was aborted in the engine)
            except Exception as e:  # noqa: BLE001 - recorded as that line's failure
                logger.exception("batch line %s failed", task.id)
                result = {
                    "ok": False,
                    "status_code": 500,
                    "body": None,
                    "error": {"code": "server_error", "message": str(e)},
                }
            if result is None:
                if task.id not in self._preempted:  # the server said 429/503: give it a moment
                    self._retry_at = time.monotonic() + 1.0
                self._guard(self.queue.release, task)
            else:
                self._guard(self.queue.finish, task, result)
                self.num_finished += 1
        finally:
            self.in_flight.pop(task.id, None)
            self._preempted.discard(task.id)
            self._changed.set()
