"""RMSNorm with an optional fused residual add (the pre-norm pattern of every model here)."""

from __future__ import annotations

import torch
from torch import nn

from loom.kernels import cpu


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Same order of operations as HF: normalize in float32, cast back, then scale.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With `residual`, returns (norm(x + residual), x + residual): the sum is the next residual.

        Decode-sized bf16 batches on CPU run loom's fused kernel (one call for the whole; this code is
        its twin)."""
        if (
            cpu.fused(x)
            and x.is_contiguous()
            and self.weight.dtype == x.dtype
            and (residual is None or (residual.is_contiguous() and residual.dtype == x.dtype))
        ):
            return cpu.rms_norm(x, self.weight.data, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
