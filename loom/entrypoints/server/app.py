"""The FastAPI app: routes, the edge guard (auth, body size), and the lifespan that runs the engine."""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loom.config import EngineConfig
from loom.entrypoints.server import protocol as p
from loom.entrypoints.server.agent_runs import agent_runs_router
from loom.entrypoints.server.batches import batches_router
from loom.entrypoints.server.chat import ChatCompletions
from loom.entrypoints.server.completions import Completions
from loom.entrypoints.server.config import ServerConfig
from loom.entrypoints.server.errors import (
    AuthenticationError,
    PayloadTooLarge,
    error_response,
    install_error_handlers,
)
from loom.entrypoints.server.files import FILES_PATH, files_router
from loom.entrypoints.server.serving import ServerState
from loom.errors import InvalidRequest
from loom.jobs.metrics import JobsCollector
from loom.tracing import NO_TRACING, HTTPSpans, Tracing

logger = logging.getLogger(__name__)

# Liveness probes must work without credentials and while the model loads.
OPEN_PATHS = frozenset({"/health"})


class EdgeGuard:
    """ASGI middleware run before routing: API key (401), then body size (413).

    The body is read here, up to the limit, and replayed to the app, so an oversized body is refused
    whether or not it announced its size (chunked uploads have no Content-Length).
    """

    def __init__(
        self, app: ASGIApp, api_key: str | None, max_body_bytes: int, max_file_bytes: int | None = None
    ):
        self.app = app
        self.api_key = api_key.encode() if api_key is not None else None
        self.max_body_bytes = max_body_bytes
        self.max_file_bytes = max_file_bytes if max_file_bytes is not None else max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_key(scope)
            receive = await self._read_body(scope, receive)
        except (AuthenticationError, PayloadTooLarge, InvalidRequest) as e:
            await error_response(e)(scope, receive, send)
            return
        await self.app(scope, receive, send)

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


def make_jobs(state: ServerState, config: ServerConfig, tracing: Tracing | None) -> Any:
    """The server's durable jobs (files, batches, agent runs; a JobService), opened when the app starts."""
    # Imported here: the jobs package imports the agent runtime, whose clients import this package.
    from loom.jobs.batch_runner import Throttle
    from loom.jobs.service import JobService, default_state_dir

    return JobService(
        Path(config.state_dir) if config.state_dir else default_state_dir(config.host, config.port),
        queue_url=config.job_queue,
        max_bytes=config.state_max_bytes,
        consumer=config.job_consumer or f"{socket.gethostname()}:{config.port}",
        throttle=Throttle(config.batch_max_concurrency, config.batch_idle_s, config.batch_preempt),
        priority=config.batch_priority,
        api_key=config.api_key,
        model=state.model_name,
        tracer=tracing,
    )


def create_app(
    engine_config: EngineConfig, server_config: ServerConfig | None = None, tracer_provider: Any = None
) -> FastAPI:
    """An app serving one model. The engine starts (and loads the model in the background) when the
    app's lifespan starts, so the port is open at once and /ready says when requests can run.

    `tracer_provider` (an OpenTelemetry TracerProvider) turns tracing on without an OTLP endpoint."""
    server_config = server_config or ServerConfig()
    state = ServerState(engine_config, server_config)
    chat = ChatCompletions(state)
    completions = Completions(state)
    if tracer_provider is not None:
        state.tracing = Tracing(tracer_provider)
    elif server_config.otlp_traces_endpoint:
        state.tracing = Tracing.to_endpoint(server_config.otlp_traces_endpoint)
    jobs = make_jobs(state, server_config, state.tracing if state.tracing.enabled else None)
    jobs.require_ready = state.require_core
    state.metrics.registry.register(JobsCollector(jobs))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start(asyncio.get_running_loop())
        logger.info("serving %s (the model loads in the background)", state.model_name)
        await jobs.start(
            app,
            admitted=lambda: state.num_admitted,
            accepting=lambda: state.engine.is_ready and not state.draining,
        )
        yield
        # Under `loom serve` the SIGTERM hook has drained already; this covers other ASGI servers.
        await state.drain(server_config.drain_timeout)
        await jobs.stop()
        await asyncio.to_thread(state.engine.stop)
        state.tracing.shutdown()

    app = FastAPI(title="loom", lifespan=lifespan)
    app.state.loom = state
    app.state.jobs = jobs
    install_error_handlers(app)
    app.add_middleware(
        EdgeGuard,
        api_key=server_config.api_key,
        max_body_bytes=server_config.max_body_bytes,
        max_file_bytes=server_config.max_file_bytes,
    )
    if state.tracing is not NO_TRACING:
        app.add_middleware(HTTPSpans, tracing=state.tracing)  # outermost: refused requests get spans too
    app.include_router(files_router(jobs))
    app.include_router(batches_router(jobs))
    app.include_router(agent_runs_router(jobs))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict:
        state.require_core()
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        core = state.ready_core()
        card = p.ModelCard(
            id=state.model_name, created=state.created, max_model_len=core.max_model_len if core else None
        )
        return p.ModelList(data=[card]).model_dump()

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: p.ChatCompletionRequest, request: Request) -> Response:
        return await chat.create(body, request)

    @app.post("/v1/completions")
    async def create_completion(body: p.CompletionRequest, request: Request) -> Response:
        return await completions.create(body, request)

    @app.post("/v1/programs/{program_id}/release")
    async def release_program(program_id: str) -> dict:
        """An agent program ended: unpin the KV the engine kept for its next call (its blocks stay in
        the prefix cache, evictable). Releasing an unknown or already released program is no error."""
        state.require_core()
        state.engine.release_program(program_id)
        return {"released": True}

    return app
