"""One replica: a whole loom server (the FastAPI app of `loom serve`, engine included) inside a Ray
Serve replica actor, driven in-process through ASGI.

The replica speaks only the server's public HTTP API: the ingress forwards the client's method, path,
headers and body, and gets back the status, headers and body chunks the app produced. So validation,
errors, streaming, the response cache, draining and metrics are the single-process server's own, and
the replica is as healthy as the server's /health says (the engine-thread supervisor turns it 503
when the step loop dies, and Ray then replaces the replica).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from loom.config import EngineConfig
from loom.entrypoints.server.app import create_app
from loom.entrypoints.server.config import ServerConfig
from loom.serving.policy import RouteInfo

logger = logging.getLogger(__name__)

# How often the constructor asks /ready while the model loads.
_READY_POLL_S = 0.1


@dataclass(slots=True)
class ResponseStart:
    """The first item of every answer: what the app put in http.response.start, and who answered."""

    status: int
    headers: list[tuple[bytes, bytes]]
    replica: str
    version: str


@dataclass(slots=True)
class AppResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class InProcessClient:
    """Calls an ASGI app in this process as an HTTP client would, streaming the response body.

    Leaving the iterator early (the ingress gave up, the client left) delivers http.disconnect to the
    app, which aborts the request and frees its KV blocks, as a closed socket would.
    """

    def __init__(self, app):
        self.app = app

    async def stream(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> AsyncIterator[tuple[int, list[tuple[bytes, bytes]]] | bytes]:
        """Yields (status, headers) once, then body chunks; coalesces chunks that are already waiting,
        so a busy stream crosses Ray in fewer, larger items."""
        raw_path, _, query = path.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": raw_path,
            "raw_path": raw_path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(k.lower(), v) for k, v in headers],
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 80),
        }
        disconnected = asyncio.Event()
        sent_body = False
        queue: asyncio.Queue = asyncio.Queue()

        async def receive() -> dict:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            queue.put_nowait(message)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while True:
                message = await queue.get()
                if message is None:
                    break
                if message["type"] == "http.response.start":
                    yield message["status"], list(message.get("headers", []))
                    continue
                chunks = [message.get("body", b"")]
                more = message.get("more_body", False)
                while more and not queue.empty():
                    extra = queue.get_nowait()
                    if extra is None:
                        queue.put_nowait(None)
                        break
                    chunks.append(extra.get("body", b""))
                    more = extra.get("more_body", False)
                data = b"".join(chunks)
                if data:
                    yield data
                if not more:
                    break
        finally:
            disconnected.set()
            await task

    async def call(self, method: str, path: str, body: bytes = b"") -> AppResponse:
        """A whole answer (the replica's own probes, and tests); a body is sent as JSON."""
        status, headers, chunks = 500, [], []
        sent = [(b"content-type", b"application/json")] if body else []
        async for item in self.stream(method, path, sent, body):
            if isinstance(item, tuple):
                status, headers = item
            else:
                chunks.append(item)
        return AppResponse(status, headers, b"".join(chunks))


class LoomReplica:
    """The Ray Serve deployment class of one model version (wrapped by `serve.deployment` in app.py)."""

    async def __init__(self, engine_config: EngineConfig, server_config: ServerConfig, version: str):
        from ray import serve

        self.version = version
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.app = create_app(engine_config, server_config)
        self.client = InProcessClient(self.app)
        self._lifespan: AbstractAsyncContextManager = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        # Ray routes to a replica once its constructor returns, so return only when the model has
        # loaded: a replica that is routable is one that can serve.
        while True:
            ready = await self.client.call("GET", "/ready")
            if ready.status == 200:
                break
            if b"failed to load" in ready.body:
                raise RuntimeError(f"replica {self.replica_id}: {ready.body.decode(errors='replace')}")
            await asyncio.sleep(_READY_POLL_S)
        logger.info("replica %s of %s ready", self.replica_id, version)

    async def handle(
        self, route: RouteInfo, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> AsyncIterator[ResponseStart | bytes]:
        """Serve one HTTP request: a ResponseStart, then the body in chunks."""
        async for item in self.client.stream(method, path, headers, body):
            if isinstance(item, tuple):
                yield ResponseStart(item[0], item[1], self.replica_id, self.version)
            else:
                yield item

    async def check_health(self) -> None:
        """Ray's health check: the server's own liveness answer. A failure here (three in a row, by
        Ray's default) makes Ray kill this replica and start another."""
        health = await self.client.call("GET", "/health")
        if health.status != 200:
            raise RuntimeError(f"replica {self.replica_id} is unhealthy: /health {health.status}")

    async def engine_stats(self) -> dict[str, float]:
        """The server's own gauges and counters (loom_* names without the prefix) from /metrics."""
        text = (await self.client.call("GET", "/metrics")).body.decode()
        stats: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.labels and sample.name.startswith("loom_"):
                    stats[sample.name.removeprefix("loom_")] = sample.value
        return stats

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics for `loom.serving.autoscaling.queue_and_kv_policy`."""
        stats = await self.engine_stats()
        return {
            "kv_usage": stats.get("kv_cache_usage_ratio", 0.0),
            "queue": stats.get("requests_waiting", 0.0) + stats.get("requests_running", 0.0),
        }

    async def __del__(self) -> None:
        # Ray calls this after its graceful wait for in-flight requests (scale-down, redeploy): drain
        # whatever is left and stop the engine thread.
        await self._lifespan.__aexit__(None, None, None)
