"""A circuit breaker per replica: a replica that keeps failing is taken out of rotation, then probed
back with one request at a time.

Ray Serve already drops a replica whose actor died and restarts one whose health check fails; this
covers what it cannot see: a replica that is alive and answers, but answers 5xx (its engine died and
the process has not exited yet, it is draining, it is overloaded past its limits).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _State:
    failures: int = 0
    open_until: float = 0.0
    """While failures >= threshold: the time the next probe may go (the circuit is open until then)."""


class CircuitBreaker:
    """Closed (in rotation) until `threshold` consecutive failures; then open for `cooldown_s`; then
    half-open: one probe request may go, and its outcome closes the circuit or opens it again."""

    def __init__(
        self, threshold: int = 3, cooldown_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ):
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._states: dict[str, _State] = {}
        self.opened = 0
        """Times a circuit opened (for metrics)."""

    def blocked(self) -> tuple[str, ...]:
        """Replicas to avoid now. A replica whose cooldown is over is left out once, as the probe, and
        blocked again for another cooldown unless the probe's outcome arrives first."""
        now = self.clock()
        out = []
        for replica, state in self._states.items():
            if state.failures < self.threshold:
                continue
            if now < state.open_until:
                out.append(replica)
            else:
                state.open_until = now + self.cooldown_s  # let exactly one probe through
        return tuple(out)

    def is_open(self, replica: str) -> bool:
        state = self._states.get(replica)
        return state is not None and state.failures >= self.threshold

    def record(self, replica: str, ok: bool) -> None:
        if ok:
            self._states.pop(replica, None)
            return
        state = self._states.setdefault(replica, _State())
        state.failures += 1
        if state.failures == self.threshold:
            self.opened += 1
        if state.failures >= self.threshold:
            state.open_until = self.clock() + self.cooldown_s

    def forget(self, replica: str) -> None:
        self._states.pop(replica, None)
