"""The compute roofline is drawn at the fastest exact GEMM for the dtype on this CPU."""

from __future__ import annotations

import torch

from loom.bench.roofline import measure_roofline
from loom.layers.quant import can_prepack
from loom.layers.quant.onednn import gemm_dtype


def test_bf16_roofline_uses_float32_gemms_where_the_cpu_has_no_native_bf16():
    cpu = torch.device("cpu")
    assert gemm_dtype(torch.float32, "cpu") == torch.float32
    assert gemm_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    # Without native bf16 (AVX2), loom runs bf16 linears in float32: the ceiling is float32's GEMM rate.
    assert gemm_dtype(torch.bfloat16, "cpu") == (
        torch.bfloat16 if can_prepack(torch.bfloat16, cpu) else torch.float32
    )
    roof = measure_roofline("bfloat16", square_size=128, repeats=1)
    assert roof.dtype == "bfloat16" and roof.peak_flops > 0 and roof.memory_bandwidth > 0
