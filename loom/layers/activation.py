from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.kernels import cpu


class SiluAndMul(nn.Module):
    """silu(gate) * up over the two halves of a fused gate_up projection. Decode-sized bf16 batches on
    CPU run loom's fused kernel; the code below is its twin."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu.fused(x) and x.is_contiguous():
            return cpu.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
