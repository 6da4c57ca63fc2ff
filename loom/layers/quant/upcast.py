"""CPU bfloat16 linears computed in float32, for CPUs without native bf16 (no AVX-512 BF16, no AMX).

There, PyTorch's bf16 GEMM takes a slow path: measured on a 2-core AVX2 machine, one thread, a
[M, 768] x [768, 2048] bf16 `F.linear` takes 1.7x the float32 time at M = 1 and 4.6x at M = 16 (5,584 vs
1,209 us), and oneDNN cannot prepack bf16 weights (`can_prepack`). This method keeps a float32 copy of
the weight and multiplies the bf16 input, widened, with it: every bf16 x bf16 product is exact in
float32, so the result is a bf16 GEMM with float32 accumulation rounded once to bf16, as a native kernel
computes it (up to summation order). The price is memory: the weights take twice the bf16 bytes.
The twin is `F.linear` on the bf16 weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

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
