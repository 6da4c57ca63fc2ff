"""int4 weight-only quantization: groups of `group_size` input channels share a scale and a zero point
(asymmetric), multiplied by torch's CPU kernels `_convert_weight_to_int4pack_for_cpu` (packs the weight
once, at load) and `_weight_int4pack_mm_for_cpu`.

The kernel's convention: a 4-bit value q in 0..15 stands for (q - 8) * scale + zero, with scale and zero
stored per (group, output channel) as one [in / group, out, 2] tensor in the activations' dtype. As with
int8, activations enter in bfloat16 whatever the model's dtype (its float32 path is several times slower
on AVX2; see benchmarks/quant_kernels.py), the kernel accumulates in float32 and returns bfloat16.

The packed layout is the kernel's own and differs between CPU instruction sets, so the reference twin
keeps the unpacked values instead of unpacking the kernel's (it costs memory; it is for tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from loom.layers.quant.base import LinearMethod, as_2d, finish, free_weight

if TYPE_CHECKING:
    from loom.layers.linear import Linear

COMPUTE_DTYPE = torch.bfloat16
# The packing kernel works on blocks of output channels; a layer whose out_features is not a multiple is
# padded with zero rows, and the padding's outputs are dropped.
N_MULTIPLE = 16


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [out, in] in 0..15, scales [out, in / group], zeros [out, in / group]) with
    weight ~= (q - 8) * scale + zero over each group; scales and zeros in COMPUTE_DTYPE.

    Each group's range [min, max] maps onto 0..15. Scale and zero are rounded to their stored dtype before
    q is chosen, so q is the best choice for the values the kernel will actually use."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(
            f"int4 needs in_features divisible by the group size; {in_features} is not a multiple of "
            f"{group_size} (choose a quantization_group_size that divides it)"
        )
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    # A (nearly) constant group gets a step of 1/256 of its magnitude rather than 0, so that zero, rounded
    # to bfloat16, lands within a few steps of its values; an all-zero group any step (1).
    scale = torch.maximum((hi - lo) / 15, torch.maximum(lo.abs(), hi.abs()) * 2**-8)
    scale = torch.where(scale > 0, scale, 1.0).to(COMPUTE_DTYPE)
    zero = (lo + 8 * scale.float()).to(COMPUTE_DTYPE)
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15)
    return q.to(torch.uint8).reshape(out_features, in_features), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    out_features, in_features = q.shape
    groups = scale.shape[1]
    w = q.float().reshape(out_features, groups, -1) - 8  # [out, groups, group_size]
    return (w * scale.float()[..., None] + zero.float()[..., None]).reshape(out_features, in_features)


class Int4(LinearMethod):
    name = "int4"

    def __init__(self, group_size: int):
        self.group_size = group_size

    def process_weights(self, layer: Linear, keep_weight: bool) -> None:
        q, scale, zero = quantize_int4(layer.weight, self.group_size)
        pad = -q.shape[0] % N_MULTIPLE
        if pad:
            q = torch.cat([q, q.new_full((pad, q.shape[1]), 8)])
            scale, zero = (
                torch.cat([scale, scale.new_zeros(pad, scale.shape[1])]),
                torch.cat([zero, zero.new_zeros(pad, zero.shape[1])]),
            )
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        layer.register_buffer("qweight", packed, persistent=False)
        # [in / group, out (padded), 2]: the kernel's layout
        layer.register_buffer(
            "scales_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous(), persistent=False
        )
        if not keep_weight:
            free_weight(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            as_2d(x, COMPUTE_DTYPE), layer.qweight, self.group_size, layer.scales_zeros
        )
        if out.shape[-1] != layer.out_features:
            out = out[:, : layer.out_features]
        return finish(out, x, layer.bias)

    def reference(self) -> LinearMethod:
        return Int4Reference(self.group_size)


class Int4Reference(Int4):
    """The same quantized values, unpacked: dequantize, F.linear in float32 on the bfloat16-rounded
    input, round the result to bfloat16 (the kernel's arithmetic, in plain PyTorch)."""

    name = "int4-reference"

    def process_weights(self, layer: Linear, keep_weight: bool) -> None:
        q, scale, zero = quantize_int4(layer.weight, self.group_size)
        layer.register_buffer("qvalues", q, persistent=False)  # [out, in] uint8, one value per byte
        layer.register_buffer("scales", scale, persistent=False)  # [out, in / group]
        layer.register_buffer("zeros", zero, persistent=False)
        if not keep_weight:
            free_weight(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_int4(layer.qvalues, layer.scales, layer.zeros)
        out = F.linear(as_2d(x, COMPUTE_DTYPE).float(), w).to(COMPUTE_DTYPE)
        return finish(out, x, layer.bias)

    def reference(self) -> LinearMethod:
        return self
