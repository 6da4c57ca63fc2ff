"""CPU bfloat16 linears for CPUs without native bf16 (no AVX-512 BF16, no AMX), computed in float32.

There, PyTorch's bf16 GEMM takes a slow path: measured on a 2-core AVX2 machine, one thread, a
[M, 768] x [768, 2048] bf16 `F.linear` takes 1.7x the float32 time at M = 1 and 4.6x at M = 16 (5,584 vs
1,209 us), and oneDNN cannot prepack bf16 weights (`can_prepack`). Every bf16 x bf16 product is exact in
float32, so a float32 GEMM on the widened values is a bf16 GEMM with float32 accumulation rounded once to
bf16, as a native kernel computes it (up to summation order). Two ways to get there:

- `Bf16Widened` (where loom's CPU kernels build, `cpu.available()`): the weight stays bf16, in loom's
  panels of 16 output channels (`cpu.pack_panels`), and loom's kernel widens it in registers for any
  number of rows: a decode step reads half the bytes of a float32 copy, and a prefill chunk runs at a
  higher FMA rate than torch's float32 GEMM on the widened weight (the table in loom/kernels/cpu.py).
  Each output is the same FMA chain whatever the batch, so a token's numbers do not depend on it.
- `Float32Compute` (no C compiler): a float32 copy of the weight, twice the bf16 memory.

The twin of both is `F.linear` on the bf16 weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from loom.kernels import cpu
from loom.kernels.decoder import StackLinear
from loom.layers.quant.base import UNQUANTIZED, LinearMethod, free_weight

if TYPE_CHECKING:
    from loom.layers.linear import Linear


class Float32Compute(LinearMethod):
    name = "bf16-in-fp32"

    def process_weights(self, layer: Linear, keep_weight: bool) -> None:
        layer.register_buffer("weight_fp32", layer.weight.detach().float(), persistent=False)
        bias = layer.bias.detach().float() if layer.bias is not None else None
        layer.register_buffer("bias_fp32", bias, persistent=False)
        if not keep_weight:
            free_weight(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), layer.weight_fp32, layer.bias_fp32).to(x.dtype)

    def reference(self) -> LinearMethod:
        return UNQUANTIZED


class Bf16Widened(LinearMethod):
    name = "bf16-widened"

    def process_weights(self, layer: Linear, keep_weight: bool) -> None:
        # Plain tensors for the kernel (a Parameter's attribute reads cost microseconds each, per call).
        layer.register_buffer("weight_panels", cpu.pack_panels(layer.weight.detach()), persistent=False)
        bias = layer.bias.detach().float() if layer.bias is not None else None
        layer.register_buffer("bias_fp32", bias, persistent=False)
        if not keep_weight:
            free_weight(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return cpu.matmul(x.contiguous(), layer.weight_panels, layer.out_features, bias=layer.bias_fp32)

    def stack_linear(self, layer: Linear) -> StackLinear | None:
        return StackLinear(layer.weight_panels, bias=layer.bias_fp32)

    def reference(self) -> LinearMethod:
        return UNQUANTIZED
