"""What the chat and completions handlers share: server state, admission (backpressure and draining),
and running engine requests with disconnect detection. SSE framing is in sse.py, OpenAI field
conversions in fields.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from starlette.requests import Request

from loom.config import EngineConfig
from loom.engine.async_engine import AsyncEngine
from loom.engine.core import EngineCore
from loom.entrypoints.response_cache import InMemoryResponseCache
from loom.entrypoints.server.config import ServerConfig
from loom.entrypoints.server.errors import (
    ClientDisconnected,
    ModelNotFound,
    ServiceUnavailable,
    TooManyRequests,
)
from loom.entrypoints.server.metrics import ServerMetrics
from loom.entrypoints.server.protocol import SamplingRequest
from loom.errors import EngineDeadError, InvalidRequest
from loom.frontend.input_processor import InputProcessor, ProcessedRequest
from loom.frontend.truncation import check_policy
from loom.outputs import RequestOutput
from loom.tokenizer import Tokenizer
from loom.tracing import NO_TRACING

logger = logging.getLogger(__name__)

# After a drain timeout cut what was in flight, the longest wait for those answers to go out.
CUT_GRACE_S = 5.0


T = TypeVar("T")
# Rendering and tokenizing run here, never on the event loop; two workers keep one huge prompt from
# holding up every other request's preparation.
FRONTEND_WORKERS = 2


class Lease:
    """An admitted request's share of the in-flight budget; released exactly once when it ends."""

    def __init__(self, state: ServerState, count: int, tokens: int):
        self.state, self.count, self.tokens = state, count, tokens
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.num_admitted -= self.count
            self.state.admitted_tokens -= self.tokens


class ServerState:
    """Everything one app instance owns (kept on `app.state.loom`; nothing module-global)."""

    def __init__(self, engine_config: EngineConfig, config: ServerConfig):
        self.engine_config = engine_config
        self.config = config
        self.model_name = config.served_model_name or engine_config.model or "loom-tiny"
        self.response_cache = (
            InMemoryResponseCache(config.response_cache_max_bytes, config.response_cache_ttl_s)
            if config.response_cache
            else None
        )
        self.metrics = ServerMetrics(self.ready_core, self.response_cache)
        self.engine = AsyncEngine(
            engine_config,
            on_step=self.metrics.on_step,
            max_prompt_chars=config.max_prompt_chars,
            on_dead=self._on_engine_dead,
        )
        self.on_fatal: Callable[[], None] | None = None
        """Set by `loom serve`: end the process with a non-zero status (the engine died)."""
        self._frontend_pool = ThreadPoolExecutor(FRONTEND_WORKERS, thread_name_prefix="loom-frontend")
        self.tracing = NO_TRACING  # create_app turns it on (--otlp-traces-endpoint)
        self.created = int(time.time())
        self.draining = False
        self._drain_timeout = 0.0
        self._drain_deadline = float("inf")
        self.drain_cut: ServiceUnavailable | None = None
        """Set when the drain timed out: the error every request still in flight was answered with."""
        self._runs: set[asyncio.Queue] = set()  # the queue of every run() in progress, for the cut
        # Counted here at admission rather than read from engine.num_pending, which only grows once a
        # stream is first awaited: a burst would otherwise all pass the check before any is counted.
        self.num_admitted = 0
        self.admitted_tokens = 0
        self._token_texts: dict[int, str] = {}

    # ---- readiness, admission, draining --------------------------------------------------------

    def ready_core(self) -> EngineCore | None:
        return self.engine.core if self.engine.is_ready else None

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ModelNotFound(
                f"the model {model!r} does not exist; this server serves {self.model_name!r}", param="model"
            )

    def require_input(self) -> InputProcessor:
        """The frontend's input processor, or 503 while loading, after a failed load, or while draining."""
        self.require_core()
        return self.engine.input

    async def in_thread(self, fn: Callable[[], T]) -> T:
        """Run CPU work of the frontend (rendering, tokenizing) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._frontend_pool, fn)

    def close(self) -> None:
        self._frontend_pool.shutdown(wait=False, cancel_futures=True)

    def _on_engine_dead(self, error: EngineDeadError) -> None:
        logger.critical("the engine is dead (%s): answering 503 and shutting down", error)
        if self.on_fatal is not None:
            self.on_fatal()

    def require_live(self) -> None:
        """503 once the engine died: the process is on its way out."""
        if self.engine.dead is not None:
            raise self.engine.dead

    def require_core(self) -> EngineCore:
        """The engine core, or 503 while loading, after a failed load, after its death, or while
        draining."""
        self.require_live()
        retry = self.config.retry_after
        if self.draining:
            raise ServiceUnavailable("the server is shutting down", retry_after=retry)
        if self.engine.error is not None:
            raise ServiceUnavailable(f"the model failed to load: {self.engine.error}")
        core = self.ready_core()
        if core is None:
            raise ServiceUnavailable("the model is still loading", retry_after=retry)
        return core

    def admit(self, prompt_lengths: list[int], n: int = 1) -> Lease:
        """Reserve room for these prompts' sequences (n each) or answer 429 (checked after validation:
        bad input is a 400, and so is a request that could never be admitted, even on an idle server)."""
        cfg = self.config
        count, tokens = n * len(prompt_lengths), sum(prompt_lengths)
        if count > cfg.max_waiting:
            raise InvalidRequest(
                f"the request makes {count} sequences ({len(prompt_lengths)} prompts x n={n}); this server "
                f"runs at most {cfg.max_waiting} at once (--max-waiting), so it can never be admitted: "
                "split it into smaller requests",
                param="n" if len(prompt_lengths) == 1 else "prompt",
            )
        if self.num_admitted + count > cfg.max_waiting:
            raise TooManyRequests(
                f"the server has {self.num_admitted} sequences in flight (limit {cfg.max_waiting}); retry later",
                retry_after=cfg.retry_after,
            )
        # A request alone over the token limit is still let in when nothing else is in flight, or it
        # could never run; the context length bounds it anyway.
        limit = cfg.max_waiting_tokens
        if limit is not None and self.num_admitted > 0 and self.admitted_tokens + tokens > limit:
            raise TooManyRequests(
                f"the server has {self.admitted_tokens} prompt tokens in flight (limit {limit}); retry later",
                retry_after=cfg.retry_after,
            )
        self.num_admitted += count
        self.admitted_tokens += tokens
        return Lease(self, count, tokens)

    def begin_drain(self, timeout: float) -> None:
        """Stop admitting (503) and give what runs `timeout` seconds to finish."""
        if not self.draining:
            logger.info("draining: %d sequences in flight, up to %.1f s", self.num_admitted, timeout)
            self.draining = True
            self._drain_timeout = timeout
            self._drain_deadline = time.monotonic() + timeout

    def drain_done(self) -> bool:
        """Whether the server may exit: nothing is in flight, or the drain timed out and what it cut has
        had its answer (a stream its error event and [DONE], a plain request its 503)."""
        if self.num_admitted == 0 and self.engine.num_pending == 0:
            return True
        now = time.monotonic()
        if now < self._drain_deadline:
            return False
        if self.drain_cut is None:
            self._cut_in_flight()
        return now >= self._drain_deadline + CUT_GRACE_S

    def _cut_in_flight(self) -> None:
        logger.warning(
            "drain timeout: cutting %d sequences still in flight (%d requests)",
            self.num_admitted,
            len(self._runs),
        )
        self.drain_cut = ServiceUnavailable(
            f"the server shut down before this request finished (drain timeout of {self._drain_timeout:g} s)"
        )
        for queue in self._runs:
            queue.put_nowait((-1, self.drain_cut))

    async def drain(self, timeout: float) -> None:
        self.begin_drain(timeout)
        while not self.drain_done():
            await asyncio.sleep(0.05)

    # ---- fitting prompts ------------------------------------------------------------------------

    def truncation_policy(self, body: SamplingRequest, chat: bool) -> str:
        """The request's policy, else the server's. A server default of drop_turns cuts completions
        (which have no turns) from the left; asking for drop_turns on a completion is the client's error."""
        if body.truncation is not None:
            return check_policy(body.truncation)
        policy = self.config.truncation
        return "left" if policy == "drop_turns" and not chat else policy

    # ---- running requests ----------------------------------------------------------------------

    async def run(
        self, request: Request, jobs: list[ProcessedRequest]
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yields (job index, delta output) of all jobs as they come, until every job finishes.

        If the client disconnects, raises ClientDisconnected; if a drain timed out, ServiceUnavailable
        (in-band for a stream, a 503 otherwise); when the iterator is left for any reason,
        the unfinished jobs are aborted (their KV blocks freed) before it returns.
        """
        if self.drain_cut is not None:
            raise self.drain_cut
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, job: ProcessedRequest) -> None:
            tracker = self.metrics.track(job.params.n)
            try:
                with self.tracing.engine_request(job, self.model_name) as span:
                    async for out in self.engine.generate(job):
                        tracker.on_output(out)
                        span.on_output(out)
                        queue.put_nowait((i, out))
                queue.put_nowait((i, done))
            except BaseException as e:
                tracker.on_abort()
                if not isinstance(e, asyncio.CancelledError):
                    queue.put_nowait((i, e))
                raise

        async def watch() -> None:
            await wait_for_disconnect(request)
            queue.put_nowait((-1, ClientDisconnected("the client disconnected")))

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
        tasks.append(asyncio.create_task(watch()))
        remaining = len(jobs)
        self._runs.add(queue)
        try:
            while remaining:
                i, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            self._runs.discard(queue)
            for task in tasks:
                task.cancel()
            # Wait for the cancelled streams to post their aborts, so KV is freed before we return.
            await asyncio.gather(*tasks, return_exceptions=True)

    def token_text(self, tokenizer: Tokenizer, token_id: int) -> str:
        """The text of one token for logprobs (special tokens included); cached per server."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = tokenizer.decode([token_id], skip_special_tokens=False)
        return text


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection. The body was already read, so the next ASGI
    message can only be the disconnect (it arrives at once, not at the next poll)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
