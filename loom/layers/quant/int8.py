"""int8 weight-only quantization: one symmetric scale per output channel.

Where loom's CPU kernels build (`cpu.available()`), loom's int8 kernel multiplies any number of rows
with the weight in its panels (`cpu.pack_panels`): it streams the int8 weight at memory bandwidth in
decode steps and widens each panel once for the rows of a prefill chunk, faster than torch's
`_weight_int8pack_mm` on the AVX2 machine we measure on (the table in loom/kernels/cpu.py), which runs
elsewhere.

Activations enter in bfloat16 whatever the model's dtype (`COMPUTE_DTYPE`): torch's kernel's float32
path is scalar code on AVX2, 3-10x slower than a float32 `F.linear`, while its bfloat16 path is the fast
one (benchmarks/quant_kernels.py has the figures); loom's paths round the input the same way so that all
compute one thing. Each accumulates in float32 and rounds its result to bfloat16; the reference twin does
the same arithmetic in plain PyTorch.
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
# torch's `_weight_int8pack_mm` (where loom's kernels do not build) crashes on other widths.
IN_MULTIPLE = 8
QMAX = 127  # symmetric: -127..127, so that -w quantizes to -q


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], scales [out] in COMPUTE_DTYPE) with weight ~= q * scale[:, None].

    The scale is rounded to its stored dtype first, so q is the best choice for the scale actually used."""
    if weight.shape[1] % IN_MULTIPLE:
        raise ValueError(
            f"the int8 kernel needs in_features divisible by {IN_MULTIPLE}, got {weight.shape[1]}"
        )
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, 1.0).to(COMPUTE_DTYPE)  # an all-zero row: any scale will do
    q = torch.round(w / scale.float()[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


class Int8(LinearMethod):
    name = "int8"

    def process_weights(self, layer: Linear, keep_weight: bool) -> None:
        q, scale = quantize_int8(layer.weight)
        if self.panels():
            layer.register_buffer("qpanels", cpu.pack_panels(q), persistent=False)  # loom's kernel
        else:
            layer.register_buffer("qweight", q, persistent=False)  # [out, in]: torch's kernel, the twin
        layer.register_buffer("scales", scale, persistent=False)  # [out]
        layer.register_buffer("scales_fp32", scale.float(), persistent=False)  # what loom's kernel reads
        if not keep_weight:
            free_weight(layer)

    def panels(self) -> bool:
        """Whether the weight goes in loom's panels (loom's kernel runs) or stays [out, in]."""
        return cpu.available()

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.panels():
            out = cpu.matmul(
                x.contiguous(), layer.qpanels, layer.out_features, layer.scales_fp32, via_bf16=True
            )
            return out if layer.bias is None else out + layer.bias
        out = torch.ops.aten._weight_int8pack_mm(as_2d(x, COMPUTE_DTYPE), layer.qweight, layer.scales)
        return finish(out, x, layer.bias)

    def stack_linear(self, layer: Linear) -> StackLinear | None:
        # `apply` in a bf16 model: the kernel's bf16 result, plus the bf16 bias as torch adds it
        return StackLinear(layer.qpanels, layer.scales_fp32, bias_after=layer.bias)

    def reference(self) -> LinearMethod:
        return Int8Reference()


class Int8Reference(Int8):
    """Dequantize the same int8 weight, F.linear in float32 on the bfloat16-rounded input, round the
    result to bfloat16: the kernel's arithmetic, in plain PyTorch."""

    name = "int8-reference"

    def panels(self) -> bool:
        return False

    def stack_linear(self, layer: Linear) -> StackLinear | None:
        return None  # a twin is plain PyTorch: its model keeps the modules

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_int8(layer.qweight, layer.scales)
        out = F.linear(as_2d(x, COMPUTE_DTYPE).float(), w).to(COMPUTE_DTYPE)
        return finish(out, x, layer.bias)

    def reference(self) -> LinearMethod:
        return self
