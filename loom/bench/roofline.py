"""Measure this machine's ceilings in-process, with the caller's torch thread count.

Two numbers bound an inference engine: matmul FLOP/s (prefill, and decode at large batch, are GEMMs)
and memory bandwidth (decode at small batch reads every weight once per step). Each is the median of
several timed repeats after a warm-up, because the machines these run on are shared and noisy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from loom.layers.quant.onednn import gemm_dtype
from loom.models.config import ModelConfig


@dataclass
class Roofline:
    """Measured ceilings of this process (one dtype, one thread count)."""

    dtype: str
    num_threads: int
    square_flops: float
    """FLOP/s of an n x n x n matmul (n = square_size)."""
    square_size: int
    model_flops: dict[int, float] = field(default_factory=dict)
    """num_tokens M -> FLOP/s of one decoder layer's GEMMs plus lm_head at M tokens, with the model's
    own weight shapes ([M, hidden] @ W.T as F.linear runs them)."""
    memory_bandwidth: float = 0.0
    """Bytes/s of a large tensor copy, counting bytes read plus bytes written."""

    def best(self, other: Roofline) -> Roofline:
        """Field-wise maximum of two measurements of the same setup: on a shared machine, a ceiling is
        the best a measurement reached, and a low one was disturbed by other processes."""
        return Roofline(
            dtype=self.dtype,
            num_threads=self.num_threads,
            square_flops=max(self.square_flops, other.square_flops),
            square_size=self.square_size,
            model_flops={m: max(f, other.model_flops.get(m, 0.0)) for m, f in self.model_flops.items()},
            memory_bandwidth=max(self.memory_bandwidth, other.memory_bandwidth),
        )

    @property
    def peak_flops(self) -> float:
        """The best matmul rate measured: the ceiling a roofline is drawn at."""
        return max([self.square_flops, *self.model_flops.values()])


def _median_seconds(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 7, warmup: int = 2) -> float:
    """FLOP/s of [m, k] @ [n, k].T (F.linear's layout) on `dtype` values, counting 2*m*k*n FLOPs per call.
    The product runs in `gemm_dtype`: a bf16 roofline on a CPU without native bf16 is float32's, the way
    loom runs bf16 there (loom/layers/quant/upcast.py)."""
    a = torch.randn(m, k).to(dtype).to(gemm_dtype(dtype, "cpu"))
    w = torch.randn(n, k).to(dtype).to(gemm_dtype(dtype, "cpu"))
    seconds = _median_seconds(lambda: F.linear(a, w), repeats, warmup)
    return 2 * m * k * n / seconds


def model_gemm_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in_features, out_features) of the GEMMs one token runs through in one layer, plus lm_head."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return [
        (h, q + 2 * kv),  # qkv_proj
        (q, h),  # o_proj
        (h, 2 * cfg.intermediate_size),  # gate_up_proj
        (cfg.intermediate_size, h),  # down_proj
        (h, cfg.vocab_size),  # lm_head
    ]


def model_flops(
    cfg: ModelConfig, num_tokens: int, dtype: torch.dtype, repeats: int = 7, warmup: int = 2
) -> float:
    """FLOP/s of the model's GEMM shapes at num_tokens rows, total FLOPs over total median time."""
    flops, seconds = 0.0, 0.0
    for k, n in model_gemm_shapes(cfg):
        a = torch.randn(num_tokens, k).to(dtype).to(gemm_dtype(dtype, "cpu"))
        w = torch.randn(n, k).to(dtype).to(gemm_dtype(dtype, "cpu"))
        seconds += _median_seconds(lambda a=a, w=w: F.linear(a, w), repeats, warmup)
        flops += 2 * num_tokens * k * n
    return flops / seconds


def memory_bandwidth(num_bytes: int = 512 * 2**20, repeats: int = 7, warmup: int = 2) -> float:
    """Bytes/s of copying a num_bytes tensor (read + write = 2 * num_bytes per copy).

    512 MiB per buffer is far beyond any last-level cache, so this is DRAM bandwidth."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), repeats, warmup)
    return 2 * num_bytes / seconds


def measure_roofline(
    dtype: torch.dtype | str,
    cfg: ModelConfig | None = None,
    num_tokens: tuple[int, ...] = (16, 64, 256, 1024),
    square_size: int = 2048,
    num_threads: int | None = None,
    repeats: int = 7,
) -> Roofline:
    """Measure matmul FLOP/s (square, and at the model's shapes when cfg is given) and memory bandwidth."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    with torch.inference_mode():
        s = square_size
        roof = Roofline(
            dtype=str(dtype).removeprefix("torch."),
            num_threads=torch.get_num_threads(),
            square_flops=matmul_flops(s, s, s, dtype, repeats),
            square_size=s,
        )
        if cfg is not None:
            roof.model_flops = {m: model_flops(cfg, m, dtype, repeats) for m in num_tokens}
        roof.memory_bandwidth = memory_bandwidth(repeats=repeats)
    return roof


def flops_per_token(cfg: ModelConfig) -> int:
    """2 x parameters: one multiply-add per weight per token (attention's context-dependent FLOPs and
    the embedding lookup are not separated out; at these sizes they are a few percent either way)."""
    return 2 * cfg.num_params


def compute_roofline_tokens_per_s(cfg: ModelConfig, flops: float) -> float:
    """The most tokens/s (prompt + output, all through the full model) flops FLOP/s can process."""
    return flops / flops_per_token(cfg)


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype | str) -> int:
    """Bytes of weights one decode step reads: every parameter once."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return cfg.num_params * torch.empty((), dtype=dtype).element_size()
