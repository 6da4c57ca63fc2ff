"""The FastAPI app: routes, the edge guard (auth, body size), and the lifespan that runs the engine."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from loom.config import EngineConfig
from loom.entrypoints.server import protocol as p
from loom.entrypoints.server.agent_runs import agent_runs_router
from loom.entrypoints.server.batches import batches_router
from loom.entrypoints.server.chat import ChatCompletions
from loom.entrypoints.server.completions import Completions
from loom.entrypoints.server.config import ServerConfig
from loom.entrypoints.server.edge import OPEN_PATHS, EdgeGuard, HostAllowList
from loom.entrypoints.server.errors import install_error_handlers
from loom.entrypoints.server.files import files_router
from loom.entrypoints.server.openapi import errors, install_openapi, streamed
from loom.entrypoints.server.serving import ServerState
from loom.entrypoints.server.tokenize import install_tokenizer_routes
from loom.jobs.metrics import JobsCollector
from loom.tracing import NO_TRACING, HTTPSpans, Tracing

logger = logging.getLogger(__name__)


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
        if state.engine.dead is None:  # a dead engine failed everything already: nothing to drain
            await state.drain(server_config.drain_timeout)
        await jobs.stop()
        await asyncio.to_thread(state.engine.stop)
        state.close()
        state.tracing.shutdown()

    app = FastAPI(title="loom", lifespan=lifespan)
    app.state.loom = state
    app.state.jobs = jobs
    install_error_handlers(app)
    hosts = server_config.host_allow_list()
    app.add_middleware(
        EdgeGuard,
        api_key=server_config.api_key,
        max_body_bytes=server_config.max_body_bytes,
        hosts=None if hosts is None else HostAllowList(hosts, bind_host=server_config.host),
        max_file_bytes=server_config.max_file_bytes,
    )
    if state.tracing is not NO_TRACING:
        app.add_middleware(HTTPSpans, tracing=state.tracing)  # outermost: refused requests get spans too
    app.include_router(files_router(jobs))
    app.include_router(batches_router(jobs))
    app.include_router(agent_runs_router(jobs))

    @app.get("/health", response_model=p.Status, responses=errors())
    async def health() -> dict:
        """Liveness: the process answers (no API key needed, even while the model loads); 503 once the
        engine died."""
        state.require_live()
        return {"status": "ok"}

    @app.get("/ready", response_model=p.Status, responses=errors(503))
    async def ready() -> dict:
        """Readiness: 200 once the model has loaded, 503 while loading, after a failure, or draining."""
        state.require_core()
        return {"status": "ready"}

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition (metric names start with `loom_`).",
                "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            },
            **errors(),
        },
    )
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=p.ModelList, responses=errors())
    async def models() -> dict:
        core = state.ready_core()
        card = p.ModelCard(
            id=state.model_name, created=state.created, max_model_len=core.max_model_len if core else None
        )
        return p.ModelList(data=[card]).model_dump()

    @app.post(
        "/v1/chat/completions",
        response_model=p.ChatCompletionResponse,
        responses={
            **streamed("The completion (stream: false) or its chunks (stream: true)."),
            **errors(404, 429, 503),
        },
    )
    async def create_chat_completion(body: p.ChatCompletionRequest, request: Request) -> Response:
        return await chat.create(body, request)

    @app.post(
        "/v1/completions",
        response_model=p.CompletionResponse,
        responses={
            **streamed("The completion (stream: false) or its chunks (stream: true)."),
            **errors(404, 429, 503),
        },
    )
    async def create_completion(body: p.CompletionRequest, request: Request) -> Response:
        return await completions.create(body, request)

    @app.post("/v1/programs/{program_id}/release", response_model=p.Released, responses=errors(503))
    async def release_program(program_id: str) -> dict:
        """An agent program ended: unpin the KV the engine kept for its next call (its blocks stay in
        the prefix cache, evictable). Releasing an unknown or already released program is no error."""
        state.require_core()
        state.engine.release_program(program_id)
        return {"released": True}

    install_tokenizer_routes(app, state)
    install_openapi(app, state.model_name, api_key=server_config.api_key is not None, open_paths=OPEN_PATHS)
    return app
