"""Benchmark helpers: the machine's measured ceilings (roofline) that throughput numbers are judged against."""

from loom.bench.roofline import Roofline, compute_roofline_tokens_per_s, measure_roofline

__all__ = ["Roofline", "compute_roofline_tokens_per_s", "measure_roofline"]
