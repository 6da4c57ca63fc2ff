"""Serving metrics from per-request records, named and computed as vLLM's benchmark_serving does, so a
`loom bench serve` number can be set next to a vLLM or SGLang one.

- TTFT: request sent to first streamed content chunk.
- TPOT: (E2EL - TTFT) / (output_tokens - 1): the first token excluded; only requests with > 1 token.
- ITL: every gap between consecutive content chunks, pooled over all requests (a chunk carrying several
  tokens makes one gap, as in vLLM).
- E2EL: request sent to the end of its stream.
- Goodput: completed requests per second that met EVERY given SLO.

Times are kept in seconds in records and reported in milliseconds. Token counts are the server's
`usage`; statistics are numpy's (linear-interpolated percentiles, population std), as vLLM's are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from loom.bench.workloads import Request
from loom.errors import InvalidRequest

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "std", "p90", "p99")


@dataclass(slots=True)
class RequestRecord:
    """What the load generator saw of one request. Times in seconds."""

    index: int
    request: Request | None = None
    """What was sent (None for an agent turn never sent because an earlier turn failed)."""
    success: bool = False
    error: str | None = None
    start: float = 0.0
    """When it was sent, in seconds since the timed run began."""
    ttft: float | None = None
    e2el: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    usage_reported: bool = False
    """False: the server sent no usage; output_tokens is then the number of content chunks."""
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.success or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs or []:
        name, sep, value = spec.partition(":")
        name = name.strip().lower()
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not sep or name not in SLO_METRICS or ms <= 0:
            raise InvalidRequest(
                f"bad goodput SLO {spec!r}: expected NAME:MS with NAME in {', '.join(SLO_METRICS)} and MS > 0",
                param="goodput",
            )
        slos[name] = ms
    return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a completed request is within every SLO (ms). A one-token answer has no TPOT and counts as
    meeting a TPOT SLO, as in vLLM."""
    if not record.success:
        return False
    values = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2el": record.e2el}
    return all(values[name] * 1000 <= ms for name, ms in slos.items())


@dataclass
class Stat:
    """Summary of one latency distribution, in ms; all None when there were no samples."""

    mean: float | None = None
    median: float | None = None
    std: float | None = None
    p90: float | None = None
    p99: float | None = None
    count: int = 0

    @classmethod
    def of(cls, seconds: list[float]) -> Stat:
        if not seconds:
            return cls()
        ms = np.asarray(seconds, dtype=np.float64) * 1000
        return cls(
            mean=float(ms.mean()),
            median=float(np.median(ms)),
            std=float(ms.std()),
            p90=float(np.percentile(ms, 90)),
            p99=float(np.percentile(ms, 99)),
            count=len(ms),
        )


@dataclass
class ServeMetrics:
    completed: int
    failed: int
    duration: float
    """Seconds from the first arrival to the last request's end."""
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    request_goodput: float | None
    """None when no SLO was given."""
    output_throughput: float
    total_token_throughput: float
    ttft: Stat
    tpot: Stat
    itl: Stat
    e2el: Stat
    usage_missing: int
    """Completed requests whose stream carried no usage (their output counts are chunk counts)."""

    def flat(self) -> dict[str, float | int | None]:
        """vLLM's flat key names: completed, ..., mean_ttft_ms, median_ttft_ms, std_ttft_ms, p90_ttft_ms, ..."""
        out: dict[str, float | int | None] = {
            "completed": self.completed,
            "failed": self.failed,
            "duration": self.duration,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "usage_missing": self.usage_missing,
        }
        for metric in LATENCY_METRICS:
            stat = getattr(self, metric)
            for s in STATS:
                out[f"{s}_{metric}_ms"] = getattr(stat, s)
        return out


def compute_metrics(
    records: list[RequestRecord], duration: float, slos: dict[str, float] | None = None
) -> ServeMetrics:
    """Aggregate the records of a timed run (warm-up excluded) that took `duration` seconds."""
    done = [r for r in records if r.success]
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens or 0 for r in done)
    per_s = 1.0 / duration if duration > 0 else 0.0
    return ServeMetrics(
        completed=len(done),
        failed=len(records) - len(done),
        duration=duration,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(done) * per_s,
        request_goodput=sum(meets_slos(r, slos) for r in done) * per_s if slos else None,
        output_throughput=output_tokens * per_s,
        total_token_throughput=(input_tokens + output_tokens) * per_s,
        ttft=Stat.of([r.ttft for r in done]),
        tpot=Stat.of([t for r in done if (t := r.tpot) is not None]),
        itl=Stat.of([gap for r in done for gap in r.itl]),
        e2el=Stat.of([r.e2el for r in done]),
        usage_missing=sum(not r.usage_reported for r in done),
    )
