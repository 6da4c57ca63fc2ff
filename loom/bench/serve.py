"""The online load generator of `loom bench serve`: streams requests to any OpenAI-compatible server
(loom, vLLM, SGLang, llama.cpp's server, a hosted API) on a seeded arrival schedule and records what
each request saw. Only the server's own answers are measured: token counts come from its `usage`.

Arrivals are a gamma process (shape = burstiness, mean interval 1 / rate; burstiness 1 is Poisson), or
all at once when the rate is infinite; --max-concurrency caps requests in flight. Each request is timed
from when it is sent (after waiting for a concurrency slot), as vLLM's benchmark does.

A `dag` program runs through loom's agent runtime with this generator as its chat client
(loom/bench/programs.py), so each of its LLM calls is measured like any other request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from tqdm import tqdm

from loom.bench.metrics import RequestRecord
from loom.bench.programs import BenchChatClient
from loom.bench.workloads import DagProgram, Item, Request, Session, Workload
from loom.errors import InvalidRequest

logger = logging.getLogger(__name__)

ENDPOINTS = ("chat", "completions")


class BenchError(RuntimeError):
    """The benchmark cannot run or produced nothing to measure (bad URL, model, or every warm-up failed)."""


@dataclass
class ServeConfig:
    """Where and how `loom bench serve` sends its load."""

    base_url: str
    """The server, e.g. http://127.0.0.1:8000 or https://api.example.com/v1 (a bare host gets /v1)."""
    model: str
    """The model name to send."""
    api_key: str | None = None
    """Sent as `Authorization: Bearer <key>`."""
    endpoint: str = "chat"
    """chat (/chat/completions) or completions (/completions)."""
    request_rate: float = math.inf
    """Mean arrivals per second; inf sends every request at once."""
    burstiness: float = 1.0
    """Gamma shape of the arrival intervals: 1 is Poisson, < 1 burstier, > 1 more regular."""
    max_concurrency: int | None = None
    """Most requests in flight; None: no limit."""
    seed: int = 0
    """Seeds the arrival schedule (and the workload, built by the caller)."""
    temperature: float = 0.0
    """Sampling temperature sent with every request (0: greedy)."""
    ignore_eos: bool = False
    """Send `ignore_eos: true` (a vLLM/SGLang/loom extension) so every request decodes max_tokens."""
    extra_body: dict = field(default_factory=dict)
    """Merged into every request body, last (it may override any field). Against a loom server,
    `cache: false` is added unless given, so its response cache cannot answer a repeated prompt."""
    timeout: float = 600.0
    """Seconds without progress before a request fails."""
    progress: bool = True
    """Show a progress bar (only when attached to a terminal)."""

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise InvalidRequest(
                f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}", param="endpoint"
            )
        if not self.request_rate > 0:
            raise InvalidRequest(f"request_rate must be > 0, got {self.request_rate}", param="request_rate")
        if not self.burstiness > 0:
            raise InvalidRequest(f"burstiness must be > 0, got {self.burstiness}", param="burstiness")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise InvalidRequest(f"max_concurrency must be >= 1, got {self.max_concurrency}")

    @property
    def api_base(self) -> str:
        url = self.base_url.rstrip("/")
        return url + "/v1" if urlsplit(url).path in ("", "/") else url


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds after the start at which each of n requests arrives: the first at 0, then gamma intervals
    (shape burstiness, scale 1 / (rate * burstiness), so the mean interval is 1 / rate whatever the
    shape). An infinite rate puts every arrival at 0."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    times, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.gammavariate(burstiness, scale)
        times.append(t)
    return times


def _flatten(messages: list[dict[str, str]]) -> str:
    """A chat history as one completions prompt (raw-completions servers have no chat template)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _chunk_text(chunk: dict, chat: bool) -> str:
    """The generated text a stream chunk carries (empty for role-only, finish and usage chunks)."""
    parts = []
    for choice in chunk.get("choices") or []:
        if not chat:
            parts.append(choice.get("text") or "")
            continue
        delta = choice.get("delta") or {}
        # Reasoning servers stream thinking under these names before any content.
        parts += [
            delta.get("content") or "",
            delta.get("reasoning_content") or "",
            delta.get("reasoning") or "",
        ]
        for call in delta.get("tool_calls") or []:
            fn = call.get("function") or {}
            parts += [fn.get("name") or "", fn.get("arguments") or ""]
    return "".join(parts)


class LoadGenerator:
    """Sends requests on one shared HTTP client and fills in their records."""

    def __init__(self, config: ServeConfig, client: httpx.AsyncClient):
        self.config = config
        self.client = client
        self.chat = config.endpoint == "chat"
        self.url = config.api_base + ("/chat/completions" if self.chat else "/completions")
        self.extra_body = dict(config.extra_body)
        if config.ignore_eos:
            self.extra_body.setdefault("ignore_eos", True)
        self.is_loom = False
        """Whether the server is loom (set by _probe_models): only then are loom's own fields sent."""

    def body(self, request: Request) -> dict:
        body: dict = {"model": self.config.model, "max_tokens": request.max_tokens}
        if self.chat:
            if request.messages is None and not isinstance(request.prompt, str):
                raise InvalidRequest("token-id prompts need the completions endpoint", param="endpoint")
            body["messages"] = request.messages or [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt if request.messages is None else _flatten(request.messages)
        body |= {
            "temperature": self.config.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # Other servers may refuse a field they do not know (hosted APIs do).
        if self.is_loom and request.program_id is not None:
            body["program_id"] = request.program_id
        return body | self.extra_body

    async def send(self, request: Request, record: RequestRecord, t0: float) -> RequestRecord:
        """Stream one request; t0 is the run's start on the perf_counter clock."""
        record.request = request
        body = self.body(request)
        pieces: list[str] = []
        chunks = 0
        start = time.perf_counter()
        record.start = start - t0
        last = start
        try:
            async with self.client.stream("POST", self.url, json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    record.error = f"HTTP {resp.status_code}: {text[:500]}"
                    return record
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        record.error = f"stream error: {json.dumps(chunk['error'])[:500]}"
                        return record
                    if usage := chunk.get("usage"):
                        record.prompt_tokens = usage.get("prompt_tokens")
                        record.output_tokens = usage.get("completion_tokens")
                        record.usage_reported = record.output_tokens is not None
                    if text := _chunk_text(chunk, self.chat):
                        if record.ttft is None:
                            record.ttft = now - start
                        else:
                            record.itl.append(now - last)
                        last = now
                        chunks += 1
                        pieces.append(text)
            record.e2el = time.perf_counter() - start
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            record.error = f"{type(e).__name__}: {e}"
            return record
        record.text = "".join(pieces)
        if record.ttft is None:
            record.error = "the stream carried no generated text"
            return record
        if not record.usage_reported:
            record.output_tokens = chunks
        record.success = True
        return record


@dataclass
class ServeRun:
    records: list[RequestRecord]
    """One per request of the timed run, in workload order (an agent session's turns consecutive, and a
    dag program's calls, in the order they were made)."""
    duration: float
    extra_body: dict
    """What was merged into every request body (including what the generator added for this server)."""


async def _probe_models(gen: LoadGenerator) -> None:
    """Check the model name against /models and whether the server is loom; on loom, bypass its response
    cache, which would answer a repeated greedy request from memory and measure nothing of the engine."""
    try:
        resp = await gen.client.get(gen.config.api_base + "/models", timeout=10)
        cards = (resp.json().get("data") or []) if resp.status_code == 200 else []
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        logger.debug("could not list models: %s", e)
        return
    card = next((c for c in cards if c.get("id") == gen.config.model), None)
    if cards and card is None:
        logger.warning(
            "model %r is not among the server's models %s", gen.config.model, [c.get("id") for c in cards]
        )
    if card is None or card.get("owned_by") != "loom":
        return
    gen.is_loom = True
    if "cache" not in gen.extra_body:
        logger.info("loom server: sending cache=false so its response cache is bypassed")
        gen.extra_body["cache"] = False


async def _run_session(
    gen: LoadGenerator, session: Session, records: list[RequestRecord], t0: float, slot, bar: tqdm
) -> None:
    """Turn k+1 is built from turn k's answer, so it is sent only once turn k has finished."""
    answers: list[str] = []
    for turn, record in enumerate(records):
        if len(answers) < turn:
            record.error = "not sent: an earlier turn of its session failed"
        else:
            async with slot:
                await gen.send(session.request(turn, answers), record, t0)
            if record.success:
                answers.append(record.text)
        bar.update()


async def _run_item(
    gen: LoadGenerator,
    item: Item,
    records: list[RequestRecord],
    t0: float,
    slot,
    bar: tqdm,
    programs: BenchChatClient,
) -> None:
    if isinstance(item, Session):
        await _run_session(gen, item, records, t0, slot, bar)
    elif isinstance(item, DagProgram):
        await programs.run(item, records)
    else:
        async with slot:
            await gen.send(item, records[0], t0)
        bar.update()


def _check_endpoint(config: ServeConfig, workload: Workload) -> None:
    """Refuse items the endpoint cannot carry, before anything is sent."""
    if config.endpoint == "chat" and any(
        isinstance(it, Request) and it.prompt is not None and not isinstance(it.prompt, str)
        for it in workload.items
    ):
        raise InvalidRequest("token-id prompts need --endpoint completions", param="endpoint")
    if config.endpoint != "chat" and any(isinstance(it, DagProgram) for it in workload.items):
        raise InvalidRequest(
            "the dag workload runs chat calls through the agent runtime: it needs --endpoint chat",
            param="endpoint",
        )


async def run_load(
    config: ServeConfig,
    workload: Workload,
    warmup: Workload | None = None,
    on_timed_start: Callable[[], None] | None = None,
) -> ServeRun:
    """Send the warm-up requests (not measured), then the workload on its arrival schedule.
    `on_timed_start` runs between the two (to snapshot the server's counters)."""
    _check_endpoint(config, workload)
    limits = httpx.Limits(
        max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency
    )
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = httpx.Timeout(config.timeout, connect=min(config.timeout, 30.0))
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=timeout) as client:
        gen = LoadGenerator(config, client)
        await _probe_models(gen)
        slot = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else nullcontext()
        if warmup is not None and warmup.items:
            await _warm_up(gen, warmup, slot)
        if on_timed_start is not None:
            on_timed_start()

        n = workload.num_requests
        records = [RequestRecord(i) for i in range(n)]
        times = arrival_times(len(workload.items), config.request_rate, config.burstiness, config.seed)
        with tqdm(total=n, desc="bench serve", unit="req", disable=None if config.progress else True) as bar:
            t0 = time.perf_counter()
            programs = BenchChatClient(gen, t0, slot, bar)
            tasks, first = [], 0
            for item, at in zip(workload.items, times, strict=True):
                if (delay := t0 + at - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
                batch = records[first : first + item.num_requests]
                tasks.append(asyncio.create_task(_run_item(gen, item, batch, t0, slot, bar, programs)))
                first += item.num_requests
            await asyncio.gather(*tasks)
            duration = time.perf_counter() - t0
            await programs.released()
    return ServeRun(records, duration, dict(gen.extra_body))


async def _warm_up(gen: LoadGenerator, warmup: Workload, slot) -> None:
    """Send the first turn of each warm-up item, concurrently; fail early if none succeeds (a wrong URL,
    model name or key shows here, before the timed run)."""
    requests = [it.first_request() for it in warmup.items]
    records = [RequestRecord(i) for i in range(len(requests))]

    async def one(request: Request, record: RequestRecord) -> None:
        async with slot:
            await gen.send(request, record, time.perf_counter())

    await asyncio.gather(*(one(q, r) for q, r in zip(requests, records, strict=True)))
    failed = [r for r in records if not r.success]
    if len(failed) == len(records):
        raise BenchError(f"every warm-up request failed; first error: {failed[0].error}")
    if failed:
        logger.warning("%d of %d warm-up requests failed: %s", len(failed), len(records), failed[0].error)


# loom's counters that `loom bench serve` reports as the server's own view of the timed run.
LOOM_COUNTERS = {
    "loom_prefix_cache_queries_total": "prefix_cache_query_tokens",
    "loom_prefix_cache_hits_total": "prefix_cache_hit_tokens",
    "loom_encoder_cache_queries_total": "encoder_cache_queries",
    "loom_encoder_cache_hits_total": "encoder_cache_hits",
    "loom_images_encoded_total": "images_encoded",
    "loom_vision_encode_seconds_total": "vision_encode_seconds",
    "loom_engine_steps_total": "engine_steps",
}


def scrape_loom_counters(config: ServeConfig) -> dict[str, float]:
    """loom's counters from the server's /metrics ({} for a server that is not loom, or unreachable)."""
    parts = urlsplit(config.base_url)
    url = f"{parts.scheme}://{parts.netloc}/metrics"
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    try:
        text = httpx.get(url, headers=headers, timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in LOOM_COUNTERS:
            try:
                out[LOOM_COUNTERS[name]] = float(value)
            except ValueError:
                continue
    return out
