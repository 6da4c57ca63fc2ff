"""ScaleOutConfig: how `loom serve --replicas N` runs on Ray Serve (replicas, routing, retries, canary,
autoscaling). Its fields are `loom serve` flags, like EngineConfig's and ServerConfig's."""

from __future__ import annotations

from dataclasses import dataclass

from loom.errors import InvalidRequest

ROUTING_POLICIES = ("cache_aware", "round_robin", "power_of_two")


@dataclass
class ScaleOutConfig:
    """Replicas on Ray Serve behind loom's router. `replicas` unset keeps the single-process server."""

    replicas: int | None = None
    """Engine replicas to run on Ray Serve (needs the loom[ray] extra); unset serves in this one process without Ray."""
    ray_address: str | None = None
    """Ray cluster to join ("auto" or ray://host:port); unset starts a local Ray on this machine."""
    replica_num_cpus: float = 1.0
    """Ray CPUs each replica reserves (placement only; --num-threads sets torch's threads)."""
    max_ongoing_requests: int = 64
    """Most requests Ray Serve sends one replica at once; more wait in the router."""
    routing: str = "cache_aware"
    """How a request picks its replica: cache_aware (program_id, then prompt prefix, then least loaded), round_robin, or power_of_two (Ray Serve's default)."""
    # Thresholds after SGLang's cache_aware router (cache_threshold 0.3, balance_abs_threshold 64,
    # balance_rel_threshold 1.5). Its 64 is about a quarter of a GPU worker's running batch; a quarter of
    # a loom CPU replica's (~27 rows per decode step in benchmarks/README.md) is 7, hence 8. The
    # relative test is scale-free and kept as is.
    balance_abs_threshold: int = 8
    """Load counts as imbalanced when the busiest replica has more than this many requests above the idlest (and balance_rel_threshold holds); routing then ignores the cache and picks the least loaded."""
    balance_rel_threshold: float = 1.5
    """...and when the busiest replica has more than this many times the idlest one's requests."""
    cache_threshold: float = 0.3
    """Least fraction of a prompt's blocks a replica must hold for prefix routing; below it the least loaded replica gets the request."""
    prefix_block_chars: int = 64
    """Characters of the rendered request hashed into one router block (about one 16-token KV block of English)."""
    prefix_blocks_per_replica: int = 65536
    """Most block hashes the router remembers per replica (least recently used go first); bounds its memory."""
    max_retries: int = 4
    """Times a request that failed before its first token (replica died, 503, refused) is retried on another replica."""
    retry_backoff_s: float = 0.1
    """Wait before the first retry; doubled for each next one (up to 2 s)."""
    breaker_failures: int = 3
    """Consecutive failures that take a replica out of rotation."""
    breaker_cooldown_s: float = 5.0
    """Seconds an out-of-rotation replica waits before one probe request may try it again."""
    model_version: str = "stable"
    """Name of the --model version, sent back in the x-loom-model-version header."""
    canary: str | None = None
    """Model directory of a canary version served beside --model, on its own replicas."""
    canary_version: str = "canary"
    """Name of the canary version in x-loom-model-version and in metrics."""
    canary_weight: float = 10.0
    """Percent of programs/sessions (or of requests without either) the canary gets at first."""
    canary_replicas: int = 1
    """Replicas of the canary version."""
    canary_step: float = 10.0
    """Percent added to the canary's weight after each healthy step (100 promotes it); 0 never promotes."""
    canary_step_interval_s: float = 60.0
    """Seconds between promotion steps; each needs a healthy window with enough canary requests."""
    rollback_window_s: float = 60.0
    """Sliding window, in seconds, over which canary and stable 5xx rates and TTFT p95 are compared."""
    rollback_min_requests: int = 10
    """Canary requests the window must hold before the canary is judged (promoted or rolled back)."""
    rollback_error_margin: float = 0.05
    """Roll back when the canary's 5xx rate exceeds the stable version's by more than this (absolute)."""
    rollback_ttft_margin: float = 0.5
    """Roll back when the canary's TTFT p95 exceeds the stable version's by more than this fraction."""
    autoscale_max_replicas: int | None = None
    """When set, autoscale each version between --replicas and this many replicas by queue length and KV usage."""
    target_ongoing_requests: float = 8.0
    """Autoscaling: requests in flight per replica to aim for."""
    target_kv_usage: float = 0.8
    """Autoscaling: fraction of KV-cache blocks in use per replica to aim for."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"{name} {why}", param=name)

        for name in ("replicas", "autoscale_max_replicas"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise bad(name, f"must be >= 1, got {value}")
        for name in ("max_ongoing_requests", "prefix_block_chars", "prefix_blocks_per_replica"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("canary_replicas", "breaker_failures", "rollback_min_requests"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.routing not in ROUTING_POLICIES:
            raise bad("routing", f"must be one of {ROUTING_POLICIES}, got {self.routing!r}")
        if not 0 <= self.canary_weight <= 100:
            raise bad("canary_weight", f"must be in [0, 100], got {self.canary_weight}")
        if not 0 <= self.canary_step <= 100:
            raise bad("canary_step", f"must be in [0, 100], got {self.canary_step}")
        if not 0 <= self.cache_threshold <= 1:
            raise bad("cache_threshold", f"must be in [0, 1], got {self.cache_threshold}")
        if self.balance_rel_threshold < 1:
            raise bad("balance_rel_threshold", f"must be >= 1, got {self.balance_rel_threshold}")
        for name in ("balance_abs_threshold", "max_retries"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        for name in (
            "replica_num_cpus",
            "retry_backoff_s",
            "breaker_cooldown_s",
            "rollback_error_margin",
            "rollback_ttft_margin",
        ):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("canary_step_interval_s", "rollback_window_s", "target_ongoing_requests"):
            if getattr(self, name) <= 0:
                raise bad(name, f"must be > 0, got {getattr(self, name)}")
        if not 0 < self.target_kv_usage <= 1:
            raise bad("target_kv_usage", f"must be in (0, 1], got {self.target_kv_usage}")
        if self.model_version == self.canary_version:
            raise bad("canary_version", f"must differ from model_version ({self.model_version!r})")
        if self.canary is not None and self.replicas is None:
            raise bad("canary", "needs --replicas (a canary runs on Ray Serve beside the stable version)")
        if (
            self.autoscale_max_replicas is not None
            and self.replicas is not None
            and self.autoscale_max_replicas < self.replicas
        ):
            raise bad(
                "autoscale_max_replicas",
                f"must be >= replicas ({self.replicas}), got {self.autoscale_max_replicas}",
            )
