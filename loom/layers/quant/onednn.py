"""CPU bfloat16 linears with the weight prepacked once into oneDNN's blocked layout.

A plain `F.linear` reorders the weight on every call, which costs as much as the product itself at decode
batch sizes: prepacked, a [16, 768] x [768, 4864] GEMM runs at 415 instead of 231 GFLOP/s on an AVX-512
2-core machine (little difference from M = 256 up). oneDNN's bf16 reorder needs AVX-512 (bw, vl, dq) or
AVX-NE-CONVERT; on a plain AVX2 CPU it raises, and `F.linear` is the only way (`can_prepack` says which).
The twin is `F.linear` on the float weight (tests keep a copy, since prepacking frees it).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import torch

from loom.layers.quant.base import UNQUANTIZED, LinearMethod, free_weight

if TYPE_CHECKING:
    from loom.layers.linear import Linear

# The batch size oneDNN tunes a prepacked weight's layout for: a typical decode step's rows.
PREPACK_BATCH_HINT = 32


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and _onednn_bf16_prepack_works()


@cache
def gemm_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype a matmul of `dtype` values runs fastest in, exactly: float32 for bfloat16 on a CPU without
    native bf16 (AVX2), where torch's bf16 GEMM and bmm take a slow path several times slower than
    float32, and bf16 products are exact in float32. Cached: the decode attention asks every layer."""
    if dtype == torch.bfloat16 and device_type == "cpu" and not _onednn_bf16_prepack_works():
        return torch.float32
    return dtype


@cache
def _onednn_bf16_prepack_works() -> bool:
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), PREPACK_BATCH_HINT)
    except RuntimeError:
        return False
    return True


class OneDNNPrepacked(LinearMethod):
    name = "onednn-bf16"

    def process_weights(self, layer: Linear, keep_weight: bool) -> None:
        packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), PREPACK_BATCH_HINT)
        layer.register_buffer("packed", packed, persistent=False)
        if not keep_weight:
            free_weight(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed, layer.bias, "none", [], "")

    def reference(self) -> LinearMethod:
        return UNQUANTIZED
