"""Rotary position embedding: full or partial, rotate-half (Llama, Qwen2) or interleaved (GLM) pairs,
with the default, linear and llama3 frequency schedules, and multimodal rotary (M-RoPE, GLM-4.1V): three
position ids per token (temporal, height, width), each turning its own band of frequencies."""

from __future__ import annotations

import math

import torch
from torch import nn

from loom.errors import ModelLoadError
from loom.kernels import cpu


def _heads_contiguous(x: torch.Tensor) -> bool:
    """Each token's [heads, head_dim] in one run of memory (tokens may be strided): what the kernel reads."""
    return x.dtype == torch.bfloat16 and x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]


def _inv_freq(rotary_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, a smooth blend between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ModelLoadError(f"rope scaling type {rope_type!r} is not supported")


class RotaryEmbedding(nn.Module):
    """Applies RoPE to the first `rotary_dim` dims of each head; the rest pass through."""

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_position: int,
        base: float,
        interleaved: bool = False,
        scaling: dict | None = None,
        mrope_section: tuple[int, ...] | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved
        self.mrope_section = list(mrope_section) if mrope_section else None
        if self.mrope_section and (
            len(self.mrope_section) != 3 or sum(self.mrope_section) != rotary_dim // 2
        ):
            raise ModelLoadError(
                f"mrope_section {mrope_section} must be 3 bands summing to rotary_dim / 2 = {rotary_dim // 2}"
            )
        inv_freq = _inv_freq(rotary_dim, base, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)  # [max_pos, rot/2]
        # float32 cache, cast per call to the activations' dtype (as HF does).
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)
        self._memo: tuple | None = None

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]; positions is
        [num_tokens], or [3, num_tokens] (temporal, height, width) in M-RoPE mode."""
        cos, sin = self.cos_sin(positions, q.dtype)
        if cpu.fused(q, tokens=q.shape[0]) and _heads_contiguous(q) and _heads_contiguous(k):
            # loom's kernel, one call per tensor, reading q and k in place; _apply is its twin
            c, s = cos.squeeze(1), sin.squeeze(1)
            return (
                cpu.rotary(q, c, s, self.rotary_dim, self.interleaved),
                cpu.rotary(k, c, s, self.rotary_dim, self.interleaved),
            )
        return self._apply(q, cos, sin), self._apply(k, cos, sin)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [num_tokens, 1, rotary_dim / 2] of these positions, in `dtype`."""
        # Every layer of a model shares one RotaryEmbedding and gets the same positions tensor in a
        # forward: the gather and cast are done by the first layer and reused by the others.
        memo = self._memo
        if memo is not None and memo[0] is positions and memo[1] == dtype:
            return memo[2], memo[3]
        cos, sin = self.cos_cache[positions], self.sin_cache[positions]
        if positions.dim() == 2:
            # M-RoPE: frequency band i (of mrope_section) turns with position axis i. [3, n, rot/2] -> [n, rot/2]
            cos = torch.cat([c[i] for i, c in enumerate(cos.split(self.mrope_section, dim=-1))], dim=-1)
            sin = torch.cat([s[i] for i, s in enumerate(sin.split(self.mrope_section, dim=-1))], dim=-1)
        cos = cos.to(dtype).unsqueeze(1)  # [num_tokens, 1, rot/2]
        sin = sin.to(dtype).unsqueeze(1)
        self._memo = (positions, dtype, cos, sin)
        return cos, sin

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot = x[..., : self.rotary_dim]
        if self.interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        if self.rotary_dim == self.head_dim:
            return out
        return torch.cat((out, x[..., self.rotary_dim :]), dim=-1)
