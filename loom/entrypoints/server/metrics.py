"""Prometheus metrics (prefix `loom_`) in a registry owned by one app, never the process-global one.

Four sources feed them:
- counters and the batch-size histogram, from the engine's on_step hook (engine thread, after each step);
- gauges (running, waiting, KV usage and free blocks) and the engine's own step and eviction counts,
  read from the engine at scrape time: an abort that empties the engine runs no step, so a gauge set in
  on_step would keep its last value forever;
- the response cache's counts, read from it at scrape time;
- request latencies, finish reasons and truncations, from the handlers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loom.engine.core import EngineCore
from loom.engine.io import EngineCoreOutput
from loom.entrypoints.response_cache import CacheStats, InMemoryResponseCache
from loom.outputs import RequestOutput

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = tuple(float(2**k) for k in range(13))


class _EngineGauges(Collector):
    """Values read from the live engine on every scrape (plain ints read under the GIL): gauges, and
    counters the engine itself keeps (so they are exact at any moment, not as of the last step)."""

    def __init__(self, get_core: Callable[[], EngineCore | None]):
        self.get_core = get_core

    def collect(self) -> Iterator[Metric]:
        return self._families(self.get_core())

    def describe(self) -> Iterator[Metric]:
        return self._families(None)  # names only: the engine may not exist yet

    def _families(self, core: EngineCore | None) -> Iterator[Metric]:
        gauges = {
            "requests_running": ("Sequences in the running batch.", 0),
            "requests_waiting": ("Sequences waiting to be scheduled (incl. preempted).", 0),
            "kv_cache_usage_ratio": (
                "Fraction of KV-cache blocks in use (cached free blocks count as free).",
                0.0,
            ),
            "kv_free_blocks": (
                "KV-cache blocks free for new tokens (incl. evictable prefix-cache blocks).",
                0,
            ),
            "kv_total_blocks": ("KV-cache blocks in the pool.", 0),
            "kv_cached_blocks": ("KV-cache blocks holding an indexed prefix.", 0),
            "prefix_cache_cached_blocks": ("KV-cache blocks holding an indexed prefix.", 0),
            "kv_pinned_blocks": ("KV-cache blocks pinned for the next call of an agent program.", 0),
        }
        counters = {
            "engine_steps": ("Engine steps that ran a forward pass.", 0),
            "prefix_cache_evictions": ("Cached prefix blocks evicted to make room.", 0),
            "encoder_cache_queries": ("Images a step needed the vision encoder's output of.", 0),
            "encoder_cache_hits": ("... found in the encoder cache (not encoded again).", 0),
            "images_encoded": ("Images run through the vision encoder.", 0),
            "vision_encode_seconds": ("Seconds spent in the vision encoder.", 0.0),
        }
        if core is not None:
            pool = core.kv.pool
            current = {
                "requests_running": core.scheduler.num_running,
                "requests_waiting": core.scheduler.num_waiting,
                "kv_cache_usage_ratio": core.kv.usage(),
                "kv_free_blocks": core.kv.num_free_blocks,
                "kv_total_blocks": pool.num_blocks,
                "kv_cached_blocks": pool.num_cached_blocks,
                "prefix_cache_cached_blocks": pool.num_cached_blocks,
                "kv_pinned_blocks": core.kv.num_pinned_blocks,
                "engine_steps": core.stats.num_steps,
                "prefix_cache_evictions": pool.num_evictions,
            }
            mm = core.runner.mm
            if mm is not None:
                current.update(
                    encoder_cache_queries=mm.stats.queries,
                    encoder_cache_hits=mm.stats.hits,
                    images_encoded=mm.stats.images_encoded,
                    vision_encode_seconds=mm.stats.encode_seconds,
                )
            gauges = {name: (doc, current[name]) for name, (doc, _) in gauges.items()}
            counters = {name: (doc, current.get(name, 0)) for name, (doc, _) in counters.items()}
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"loom_{name}", doc, value=value)
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"loom_{name}", doc, value=value)


class _ResponseCacheStats(Collector):
    """The response cache's own counts, read on every scrape (all zero when the cache is off)."""

    def __init__(self, cache: InMemoryResponseCache | None):
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        stats = self.cache.stats if self.cache is not None else CacheStats()
        yield CounterMetricFamily(
            "loom_response_cache_hits", "Requests answered from the response cache.", value=stats.hits
        )
        yield CounterMetricFamily(
            "loom_response_cache_misses",
            "Deterministic requests looked up in the response cache and not found.",
            value=stats.misses,
        )
        yield CounterMetricFamily(
            "loom_response_cache_evictions",
            "Answers evicted to stay within --response-cache-max-bytes.",
            value=stats.evictions,
        )
        yield GaugeMetricFamily("loom_response_cache_bytes", "Bytes of cached answers.", value=stats.bytes)
        yield GaugeMetricFamily("loom_response_cache_entries", "Cached answers.", value=stats.entries)


@dataclass
class _Totals:
    """The engine's cumulative counts at the previous step, to turn them into counter increments."""

    prefix_queries: int = 0
    prefix_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    forward_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verifications: int = 0


class ServerMetrics:
    """All of one server's metrics. `on_step` is the AsyncEngine hook; `track()` follows one request."""

    def __init__(
        self, get_core: Callable[[], EngineCore | None], response_cache: InMemoryResponseCache | None = None
    ):
        self.registry = CollectorRegistry()
        r = self.registry
        self.prefix_cache_queries = Counter(
            "loom_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_cache_hits = Counter(
            "loom_prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r
        )
        self.prompt_tokens = Counter(
            "loom_prompt_tokens", "Prompt tokens computed (prefill; prefix-cache hits excluded).", registry=r
        )
        self.generation_tokens = Counter("loom_generation_tokens", "Tokens generated.", registry=r)
        self.preemptions = Counter("loom_preemptions", "Sequences preempted to free KV blocks.", registry=r)
        self.spec_draft_tokens = Counter(
            "loom_spec_decode_num_draft_tokens", "Draft tokens proposed and verified.", registry=r
        )
        self.spec_accepted_tokens = Counter(
            "loom_spec_decode_num_accepted_tokens", "Draft tokens the model accepted.", registry=r
        )
        self.spec_drafts = Counter(
            "loom_spec_decode_num_drafts",
            "Verification steps (a request's drafts checked in one forward); accepted / drafts is the "
            "mean accepted length.",
            registry=r,
        )
        self.requests = Counter(
            "loom_requests",
            "Finished completions (each of a request's n) by finish reason; abort = the client left.",
            ["finish_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "loom_time_to_first_token_seconds", "Arrival to first token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "loom_inter_token_latency_seconds",
            "Time between output steps of a request.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "loom_e2e_request_latency_seconds", "Arrival to last token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "loom_request_queue_time_seconds",
            "Arrival to first scheduled.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "loom_batch_size", "Tokens scheduled per engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.truncated_requests = Counter(
            "loom_truncated_requests",
            "Requests whose prompt a truncation policy cut to fit the context.",
            ["policy"],
            registry=r,
        )
        self.truncated_tokens = Counter(
            "loom_truncated_tokens", "Prompt tokens removed by truncation policies.", registry=r
        )
        r.register(_EngineGauges(get_core))
        r.register(_ResponseCacheStats(response_cache))
        self._last = _Totals()

    def on_step(self, core: EngineCore, outputs: list[EngineCoreOutput]) -> None:
        """Engine-thread hook: advance the counters by what this step added."""
        now = _Totals(
            prefix_queries=core.kv.stats.queries,
            prefix_hits=core.kv.stats.hits,
            prompt_tokens=core.stats.num_prompt_tokens_computed,
            generation_tokens=core.stats.num_generated_tokens,
            preemptions=core.stats.num_preemptions,
            forward_tokens=core.stats.num_forward_tokens,
            draft_tokens=core.stats.num_draft_tokens,
            accepted_tokens=core.stats.num_accepted_tokens,
            verifications=core.stats.num_verifications,
        )
        last, self._last = self._last, now
        self.prefix_cache_queries.inc(now.prefix_queries - last.prefix_queries)
        self.prefix_cache_hits.inc(now.prefix_hits - last.prefix_hits)
        self.prompt_tokens.inc(now.prompt_tokens - last.prompt_tokens)
        self.generation_tokens.inc(now.generation_tokens - last.generation_tokens)
        self.preemptions.inc(now.preemptions - last.preemptions)
        self.spec_draft_tokens.inc(now.draft_tokens - last.draft_tokens)
        self.spec_accepted_tokens.inc(now.accepted_tokens - last.accepted_tokens)
        self.spec_drafts.inc(now.verifications - last.verifications)
        if now.forward_tokens > last.forward_tokens:  # a step that only preempted ran no forward
            self.batch_size.observe(now.forward_tokens - last.forward_tokens)

    def on_truncated(self, policy: str, num_tokens: int) -> None:
        if num_tokens > 0:
            self.truncated_requests.labels(policy).inc()
            self.truncated_tokens.inc(num_tokens)

    def track(self, n: int) -> RequestTracker:
        return RequestTracker(self, n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Request-side metrics of one engine request (n completions), fed its delta outputs."""

    def __init__(self, metrics: ServerMetrics, n: int):
        self.metrics = metrics
        self.n = n
        self.num_finished = 0
        self._last_token_time: float | None = None

    def on_output(self, out: RequestOutput) -> None:
        m = self.metrics
        if any(c.token_ids for c in out.outputs):
            now = time.monotonic()
            if self._last_token_time is not None:
                m.itl.observe(now - self._last_token_time)
            self._last_token_time = now
        for c in out.outputs:
            if c.finish_reason is not None:
                self.num_finished += 1
                m.requests.labels(c.finish_reason).inc()
        if out.finished:
            times = out.metrics
            arrival = times.get("arrival_time")
            if arrival is None:
                return
            for hist, key in (
                (m.ttft, "first_token_time"),
                (m.queue_time, "first_scheduled_time"),
                (m.e2e, "finished_time"),
            ):
                if times.get(key) is not None:
                    hist.observe(max(0.0, times[key] - arrival))

    def on_abort(self) -> None:
        """The request ended before finishing (client gone, error): its open completions count as aborted."""
        if self.num_finished < self.n:
            self.metrics.requests.labels("abort").inc(self.n - self.num_finished)
            self.num_finished = self.n
