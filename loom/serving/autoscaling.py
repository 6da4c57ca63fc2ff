"""Autoscaling by queue length and KV-cache usage, as a Ray Serve custom autoscaling policy.

Ray Serve's default policy scales on requests in flight only. An LLM replica can be full with few
requests (long prompts fill the KV cache, and then new requests queue or preempt), so the replica
count aimed for is the larger of:
- requests in flight (Ray's own count, queued in routers included) / target_ongoing_requests;
- the sum over replicas of KV-cache usage (each replica's `loom_kv_cache_usage_ratio`, reported by
  `LoomReplica.record_autoscaling_stats`) / target_kv_usage.
Ray then applies min/max replicas, upscale/downscale delays and scaling factors from the deployment's
AutoscalingConfig; on scale-down it stops sending a replica requests and waits for those in flight
(graceful_shutdown_timeout_s) before the replica drains and exits.
"""

from __future__ import annotations

import math
from typing import Any


class QueueAndKVPolicy:
    """`AutoscalingPolicy(policy_function="loom.serving.autoscaling:QueueAndKVPolicy",
    policy_kwargs={"target_ongoing_requests": 8, "target_kv_usage": 0.8})`."""

    def __init__(self, target_ongoing_requests: float = 8.0, target_kv_usage: float = 0.8):
        self.target_ongoing_requests = target_ongoing_requests
        self.target_kv_usage = target_kv_usage

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        return desired_replicas(
            ctx.current_num_replicas,
            ctx.total_num_requests,
            (ctx.aggregated_metrics or {}).get("kv_usage", {}).values(),
            self.target_ongoing_requests,
            self.target_kv_usage,
        ), {}


def desired_replicas(
    current: int, in_flight: float, kv_usages, target_ongoing_requests: float, target_kv_usage: float
) -> int:
    """Replicas needed for `in_flight` requests and the replicas' KV usages (fractions); at least 1
    while any replica runs (scaling to zero is Ray's min_replicas to allow, not ours)."""
    by_queue = in_flight / target_ongoing_requests
    by_kv = sum(kv_usages) / target_kv_usage
    return max(1 if current > 0 else 0, math.ceil(max(by_queue, by_kv) - 1e-9))
