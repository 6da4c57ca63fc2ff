"""Gray releases: a weighted split between a stable and a canary version, sticky per program or
session, promoted in steps while healthy and rolled back when its 5xx rate or TTFT p95 is worse than
the stable version's by a margin over a sliding window (Argo Rollouts' analysis, KServe's
canaryTrafficPercent)."""

from __future__ import annotations

import logging
import math
import random
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Values of the loom_canary_state gauge.
STATES = {"none": 0, "canary": 1, "promoted": 2, "rolled_back": 3}


@dataclass(slots=True)
class _Sample:
    time: float
    version: str
    error: bool
    ttft_s: float | None


@dataclass(slots=True)
class VersionWindow:
    requests: int
    errors: int
    ttft_p95: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class CanaryController:
    """Decides which version a request goes to, and judges the canary on what the ingress records."""

    def __init__(
        self,
        stable: str,
        canary: str | None,
        weight: float = 10.0,
        step: float = 10.0,
        step_interval_s: float = 60.0,
        window_s: float = 60.0,
        min_requests: int = 10,
        error_margin: float = 0.05,
        ttft_margin: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        self.stable, self.canary = stable, canary
        self.weight = weight if canary is not None else 0.0
        self.step, self.step_interval_s = step, step_interval_s
        self.window_s, self.min_requests = window_s, min_requests
        self.error_margin, self.ttft_margin = error_margin, ttft_margin
        self.clock = clock
        self.rng = rng or random.Random()
        self.state = "canary" if canary is not None else "none"
        self.reason = ""
        """Why the canary was rolled back (empty otherwise)."""
        self._samples: deque[_Sample] = deque()
        self._last_step = clock()

    @property
    def versions(self) -> tuple[str, ...]:
        return (self.stable,) if self.canary is None else (self.stable, self.canary)

    def pick(self, sticky_key: str | None) -> str:
        """The version for a request. A program or session hashes to a fixed bucket in [0, 100), so it
        keeps its version while the weight grows (buckets below the weight go to the canary)."""
        if self.canary is None or self.weight <= 0:
            return self.stable
        if self.weight >= 100:
            return self.canary
        if sticky_key is None:
            bucket = self.rng.random() * 100
        else:
            bucket = zlib.crc32(sticky_key.encode()) % 10_000 / 100
        return self.canary if bucket < self.weight else self.stable

    def other(self, version: str) -> str | None:
        """Where a request that failed on `version` before its first token may be retried."""
        if self.canary is None:
            return None
        return self.stable if version == self.canary else None

    def record(self, version: str, error: bool, ttft_s: float | None) -> None:
        """One finished request: `error` for a 5xx (or a stream that broke), its TTFT if it had one."""
        self._samples.append(_Sample(self.clock(), version, error, ttft_s))
        self.evaluate()

    def window(self, version: str) -> VersionWindow:
        samples = [s for s in self._samples if s.version == version]
        ttfts = [s.ttft_s for s in samples if s.ttft_s is not None and not s.error]
        return VersionWindow(len(samples), sum(s.error for s in samples), p95(ttfts))

    def evaluate(self) -> None:
        """Roll back, step up, or wait. Called on every record and by the ingress's periodic tick."""
        now = self.clock()
        while self._samples and self._samples[0].time < now - self.window_s:
            self._samples.popleft()
        if self.state != "canary":
            return
        canary, stable = self.window(self.canary), self.window(self.stable)
        if canary.requests < self.min_requests:
            return
        if canary.error_rate > stable.error_rate + self.error_margin:
            self._roll_back(
                f"5xx rate {canary.error_rate:.1%} vs stable {stable.error_rate:.1%} "
                f"(margin {self.error_margin:.1%}) over {canary.requests} requests"
            )
            return
        if (
            canary.ttft_p95 is not None
            and stable.ttft_p95 is not None
            and canary.ttft_p95 > stable.ttft_p95 * (1 + self.ttft_margin)
        ):
            self._roll_back(
                f"TTFT p95 {canary.ttft_p95 * 1e3:.0f} ms vs stable {stable.ttft_p95 * 1e3:.0f} ms "
                f"(margin {self.ttft_margin:.0%})"
            )
            return
        if self.step > 0 and now - self._last_step >= self.step_interval_s:
            self._last_step = now
            self.weight = min(100.0, self.weight + self.step)
            if self.weight >= 100:
                self.state = "promoted"
                logger.info("canary %s promoted: it now takes all traffic", self.canary)
            else:
                logger.info("canary %s healthy: weight now %.0f%%", self.canary, self.weight)

    def _roll_back(self, reason: str) -> None:
        self.weight = 0.0
        self.state = "rolled_back"
        self.reason = reason
        logger.warning("canary %s rolled back: %s", self.canary, reason)
