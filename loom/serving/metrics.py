"""The ingress's Prometheus metrics, per model version (`loom_router_*`, `loom_canary_*`), in a registry
owned by one ingress. The replicas keep their own `loom_*` engine metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loom.serving.breaker import CircuitBreaker
from loom.serving.canary import STATES, CanaryController

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OVERHEAD_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)


class RouterMetrics:
    def __init__(self, canary: CanaryController, breaker: CircuitBreaker):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "loom_router_requests",
            "Requests answered, by model version and HTTP status.",
            ["version", "code"],
            registry=r,
        )
        self.failed_attempts = Counter(
            "loom_router_failed_attempts",
            "Tries that failed before their first token (each is retried while tries remain).",
            ["version"],
            registry=r,
        )
        self.routes = Counter(
            "loom_router_routes",
            "How the router chose a replica (program, prefix, least_loaded, ...).",
            ["reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "loom_router_time_to_first_token_seconds",
            "Arrival at the ingress to first token, streamed requests, by version.",
            ["version"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "loom_router_overhead_seconds",
            "Ingress work before a request is handed to Ray (parse, hash, pick a version).",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        weight = Gauge("loom_canary_weight", "Percent of traffic the canary version gets.", registry=r)
        weight.set_function(lambda: canary.weight)
        state = Gauge("loom_canary_state", "0 none, 1 canary, 2 promoted, 3 rolled back.", registry=r)
        state.set_function(lambda: STATES[canary.state])
        opened = Gauge("loom_router_breaker_opened", "Times a replica's circuit breaker opened.", registry=r)
        opened.set_function(lambda: breaker.opened)

    def routed(self, reason: str) -> None:
        self.routes.labels(reason).inc()

    def attempt_failed(self, version: str) -> None:
        self.failed_attempts.labels(version).inc()

    def finished(self, version: str, status: int, ttft_s: float | None) -> None:
        self.requests.labels(version, str(status)).inc()
        if ttft_s is not None:
            self.ttft.labels(version).observe(ttft_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
