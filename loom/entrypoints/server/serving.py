"""What the chat and completions handlers share: server state, admission (backpressure and draining),
running engine requests with disconnect detection, SSE framing, and OpenAI field conversions."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

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
    describe,
)
from loom.entrypoints.server.metrics import ServerMetrics
from loom.entrypoints.server.protocol import SamplingRequest, Usage
from loom.entrypoints.truncation import check_policy
from loom.errors import ContextLengthExceeded, InvalidRequest
from loom.outputs import RequestOutput
from loom.sampling_params import SamplingParams
from loom.tokenizer import Tokenizer
from loom.tracing import NO_TRACING

logger = logging.getLogger(__name__)

# Logprobs are floats in JSON; -inf (a token masked by top-k/top-p) is not valid JSON, so clamp it.
MIN_LOGPROB = -9999.0


@dataclass
class Job:
    """One engine request of an HTTP request (a completions request with k prompts makes k jobs)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


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
        self.engine = AsyncEngine(engine_config, on_step=self.metrics.on_step)
        self.tracing = NO_TRACING  # create_app turns it on (--otlp-traces-endpoint)
        self.created = int(time.time())
        self.draining = False
        self._drain_deadline = float("inf")
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

    def require_core(self) -> EngineCore:
        """The engine core, or 503 while loading, after a failed load, or while draining."""
        retry = self.config.retry_after
        if self.draining:
            raise ServiceUnavailable("the server is shutting down", retry_after=retry)
        if self.engine.error is not None:
            raise ServiceUnavailable(f"the model failed to load: {self.engine.error}")
        core = self.ready_core()
        if core is None:
            raise ServiceUnavailable("the model is still loading", retry_after=retry)
        return core

    def admit(self, prompt_lengths: list[int]) -> Lease:
        """Reserve room for these prompts or answer 429 (checked after validation: bad input is a 400)."""
        cfg = self.config
        count, tokens = len(prompt_lengths), sum(prompt_lengths)
        if self.num_admitted + count > cfg.max_waiting:
            raise TooManyRequests(
                f"the server has {self.num_admitted} requests in flight (limit {cfg.max_waiting}); retry later",
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
            logger.info("draining: %d requests in flight, up to %.1f s", self.num_admitted, timeout)
            self.draining = True
            self._drain_deadline = time.monotonic() + timeout

    def drain_done(self) -> bool:
        idle = self.num_admitted == 0 and self.engine.num_pending == 0
        if not idle and time.monotonic() >= self._drain_deadline:
            logger.warning("drain timeout: %d requests still in flight", self.num_admitted)
            return True
        return idle

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

    async def run(self, request: Request, jobs: list[Job]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yields (job index, delta output) of all jobs as they come, until every job finishes.

        If the client disconnects, raises ClientDisconnected; when the iterator is left for any reason,
        the unfinished jobs are aborted (their KV blocks freed) before it returns.
        """
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, job: Job) -> None:
            tracker = self.metrics.track(job.params.n)
            try:
                with self.tracing.engine_request(job, self.model_name) as span:
                    async for out in self.engine.generate(job.request_id, job.prompt_token_ids, job.params):
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


# ---- SSE ---------------------------------------------------------------------------------------------


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


# ---- OpenAI fields -----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(
    body: SamplingRequest,
    max_n: int,
    max_tokens: int | None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    renamed: dict[str, str] | None = None,
) -> SamplingParams:
    """SamplingParams from the fields chat and completions share (OpenAI defaults for missing ones).

    `renamed` maps SamplingParams names to the request's own, so a range error names the field the
    client sent (chat's top_logprobs is SamplingParams.logprobs).
    """
    n = 1 if body.n is None else body.n
    if n > max_n:
        raise InvalidRequest(f"n may be at most {max_n}, got {n}", param="n")
    if body.logit_bias:
        raise InvalidRequest("logit_bias is not supported by this server", param="logit_bias")

    def given(value, default):
        return default if value is None else value

    try:
        return SamplingParams(
            n=n,
            max_tokens=max_tokens,
            min_tokens=given(body.min_tokens, 0),
            temperature=given(body.temperature, 1.0),
            top_p=given(body.top_p, 1.0),
            top_k=given(body.top_k, -1),
            min_p=given(body.min_p, 0.0),
            presence_penalty=given(body.presence_penalty, 0.0),
            frequency_penalty=given(body.frequency_penalty, 0.0),
            repetition_penalty=given(body.repetition_penalty, 1.0),
            stop=body.stop,
            stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos,
            seed=body.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            priority=given(body.priority, 0),
            extra={"program_id": body.program_id} if body.program_id else {},
        )
    except InvalidRequest as e:
        e.param = (renamed or {}).get(e.param, e.param)
        raise


def finite_logprob(value: float) -> float:
    return value if value > MIN_LOGPROB else MIN_LOGPROB  # also maps NaN to the floor


def top_items(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely (token, logprob) of one position (the dict holds the chosen token and the top)."""
    return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:k]


def prompt_budget(core: EngineCore, max_tokens: int | None) -> int:
    """Prompt tokens that fit beside max_tokens (None: one token must be left to generate; the answer
    then gets the rest of the context)."""
    budget = core.max_model_len - (1 if max_tokens is None else max_tokens)
    if budget < 1:
        raise ContextLengthExceeded(
            f"max_tokens ({max_tokens}) leaves no room for a prompt in this model's context of "
            f"{core.max_model_len} tokens",
            param="max_tokens",
        )
    return budget


def usage(
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    truncated_tokens: int = 0,
    dropped_messages: int | None = None,
) -> Usage:
    """`dropped_messages` is chat's (None for completions); both extensions appear only when cut."""
    cut = truncated_tokens > 0
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details={"cached_tokens": cached_tokens},
        truncated_prompt_tokens=truncated_tokens if cut else None,
        dropped_messages=dropped_messages if cut else None,
    )


def stream_usage(body: SamplingRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage
