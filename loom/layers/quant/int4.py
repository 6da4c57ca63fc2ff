"""int4 weight-only quantization: groups of `group_size` input channels share a scale and a zero point
(asymmetric). A 4-bit value q in 0..15 stands for (q - 8) * scale + zero; scales and zeros are bf16.

Where loom's CPU kernels build (`cpu.available()`), the weight is packed in loom's layout (`cpu.pack_int4`:
blocks of 8 output channels interleaved, so that one load holds 4 input channels of all 8) and multiplied
by loom's int4 kernel (loom/kernels/gemv.c) in integer dot products at every batch size. Widening 4-bit
weights to float32 costs more instructions than streaming them takes, so the kernel quantizes the
activations too, to int8 per 32 values (`quantize_activations`, as llama.cpp's q4_0 x q8_0 dot does).
That adds an error of about 0.5% of a product's norm to int4's own (~10%).

Elsewhere torch's CPU kernels run, on unquantized bf16 activations: `_convert_weight_to_int4pack_for_cpu`
packs the weight once, at load, in torch's own layout (which differs between CPU instruction sets), with
scale and zero as one [in / group, out, 2] tensor, and `_weight_int4pack_mm_for_cpu` multiplies.

Activations enter in bfloat16 whatever the model's dtype (torch's kernel's float32 path is several times
slower on AVX2; see benchmarks/quant_kernels.py); every path accumulates in float32 and returns bfloat16.
The reference twin keeps the unpacked values and dequantizes them for F.linear (it costs memory; it is
for tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from loom.kernels import cpu
from loom.kernels.decoder import StackLinear
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


def layer_values(layer: Linear, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's int4 values (q, scales, zeros) as `quantize_int4` returns them: a GPTQ / AWQ checkpoint's
    as it shipped them (`prequantized`, by shard, set by the loader; checkpoint.py), the float weight
    quantized here otherwise, or shard by shard for a packed layer with both."""
    pre = getattr(layer, "prequantized", None)
    if not pre:
        return quantize_int4(layer.weight, group_size)
    shards = (
        {None: (0, layer.out_features)}
        if None in pre
        else getattr(layer, "shards", {None: (0, layer.out_features)})
    )
    parts = []
    for shard, (start, size) in sorted(shards.items(), key=lambda item: item[1][0]):
        if shard in pre:
            if pre[shard][1].shape[1] * group_size != layer.in_features:
                raise ValueError(f"the checkpoint's groups are not {group_size} input channels")
            parts.append(pre[shard])
        else:
            parts.append(quantize_int4(layer.weight.narrow(0, start, size), group_size))
    return tuple(torch.cat(t) for t in zip(*parts, strict=True))


def fill_weight(layer: Linear) -> None:
    """A GPTQ / AWQ layer's int4 values (`prequantized`, by shard) dequantized into its float weight, for
    a method that quantizes from the float weight (an int8 lm_head)."""
    shards = getattr(layer, "shards", {})
    for shard, values in layer.prequantized.items():
        start, size = (0, layer.out_features) if shard is None else shards[shard]
        layer.weight.data.narrow(0, start, size).copy_(dequantize_int4(*values))


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [rows, K] as loom's int4 kernel multiplies it: each 32 values quantized to int8 with the scale
    max|x| / 127 (round half to even) and dequantized again, in float32."""
    rows, k = x.shape
    blocks = x.float().reshape(rows, k // cpu.INT4_BLOCK, cpu.INT4_BLOCK)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, 0)
    return (torch.round(blocks * inv) * d).reshape(rows, k)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    out_features, in_features = q.shape
    groups = scale.shape[1]
    w = q.float().reshape(out_features, groups, -1) - 8  # [out, groups, group_size]
    return (w * scale.float()[..., None] + zero.float()[..., None]).reshape(out_features, in_features)


class Int4(LinearMethod):
    name = "int4"
    takes_prequantized = True

    def __init__(self, group_size: int):
        self.group_size = group_size

    def process_weights(self, layer: Linear, keep_weight: bool) -> None:
        q, scale, zero = layer_values(layer, self.group_size)
        layer.loom_kernel = cpu.available()
        if layer.loom_kernel:
            # in blocks of 8 output channels: [out / 8, in / 32, 128] uint8, [out / 8, in / group, 8] bf16
            qweight, scales, zeros = cpu.pack_int4(q, scale, zero)
            layer.register_buffer("qweight", qweight, persistent=False)
            layer.register_buffer("scales", scales, persistent=False)
            layer.register_buffer("zeros", zeros, persistent=False)
        else:
            self._torch_pack(layer, q, scale, zero)
        if not keep_weight:
            free_weight(layer)

    @staticmethod
    def _torch_pack(layer: Linear, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
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

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        rows = as_2d(x, COMPUTE_DTYPE)
        if not layer.loom_kernel:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows, layer.qweight, self.group_size, layer.scales_zeros
            )
            if out.shape[-1] != layer.out_features:
                out = out[:, : layer.out_features]
        else:
            out = cpu.matmul_int4(
                rows, layer.qweight, layer.scales, layer.zeros, self.group_size, layer.out_features
            )
        return finish(out, x, layer.bias)

    def stack_linear(self, layer: Linear) -> StackLinear | None:
        if not layer.loom_kernel:
            return None
        return StackLinear(
            layer.qweight,
            layer.scales,
            bias_after=layer.bias,
            zeros=layer.zeros,
            group_size=self.group_size,
        )

    def reference(self) -> LinearMethod:
        return Int4Reference(self.group_size)


class Int4Reference(Int4):
    """The same quantized values, unpacked: dequantize, F.linear in float32 on the bfloat16-rounded
    input (quantized to int8 per 32 values where loom's kernels run, as they do), round the result to
    bfloat16: the arithmetic of whichever path `Int4` takes here, in plain PyTorch."""

    name = "int4-reference"

    def stack_linear(self, layer: Linear) -> StackLinear | None:
        return None

    def process_weights(self, layer: Linear, keep_weight: bool) -> None:
        q, scale, zero = layer_values(layer, self.group_size)
        layer.register_buffer("qvalues", q, persistent=False)  # [out, in] uint8, one value per byte
        layer.register_buffer("scales", scale, persistent=False)  # [out, in / group]
        layer.register_buffer("zeros", zero, persistent=False)
        if not keep_weight:
            free_weight(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_int4(layer.qvalues, layer.scales, layer.zeros)
        rows = as_2d(x, COMPUTE_DTYPE).float()
        if cpu.available():
            # Int4 runs loom's kernel here, which quantizes the activations and sums most products
            # exactly (integer dots): float64 keeps the twin's own rounding out of the comparison
            rows = quantize_activations(rows).double()
            w = w.double()
        out = F.linear(rows, w).to(COMPUTE_DTYPE)
        return finish(out, x, layer.bias)

    def reference(self) -> LinearMethod:
        return self
