"""CPU bfloat16 linears for CPUs without native bf16 (no AVX-512 BF16, no AMX), computed in float32.

There, PyTorch's bf16 GEMM takes a slow path: measured on a 2-core AVX2 machine, one thread, a
[M, 768] x [768, 2048] bf16 `F.linear` takes 1.7x the float32 time at M = 1 and 4.6x at M = 16 (5,584 vs
1,209 us), and oneDNN cannot prepack bf16 weights (`can_prepack`). Every bf16 x bf16 product is exact in
float32, so a float32 GEMM on the widened values is a bf16 GEMM with float32 accumulation rounded once to
bf16, as a native kernel computes it (up to summation order). Two ways to get there:

- `Bf16Widened` (where loom's CPU kernels build, `cpu.available()`): the weight stays bf16; up to
  `cpu.BF16_MAX_ROWS` rows (decode steps) loom's kernel widens it in registers, reading half the bytes of a
  float32 copy; beyond (prefill chunks) the weight is widened per call for a float32 `F.linear`.
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
        layer.register_buffer("weight_bf16", layer.weight.detach(), persistent=False)
        bias = layer.bias.detach().float() if layer.bias is not None else None
        layer.register_buffer("bias_fp32", bias, persistent=False)
        layer.gemv_rows = cpu.BF16_MAX_ROWS if layer.in_features % cpu.K_MULTIPLE == 0 else 0

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= layer.gemv_rows * layer.in_features:
            return cpu.matmul(x.contiguous(), layer.weight_bf16, bias=layer.bias_fp32)
        return F.linear(x.float(), layer.weight_bf16.float(), layer.bias_fp32).to(x.dtype)

    def stack_linear(self, layer: Linear) -> StackLinear | None:
        if not layer.gemv_rows:
            return None
        return StackLinear(layer.weight_bf16, bias=layer.bias_fp32, max_rows=layer.gemv_rows)

    def reference(self) -> LinearMethod:
        return UNQUANTIZED
