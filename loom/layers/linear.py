"""Linear layers, including the packed ones (qkv_proj, gate_up_proj) that checkpoints may store split.

Each parameter carries a `weight_loader(param, tensor, shard_id)` the model loader calls, so packing is
the layer's business and the loader stays a name mapping.

On CPU in bfloat16, `prepack_linears` reorders every weight once, after loading, into oneDNN's blocked
layout. A plain `F.linear` reorders the weight on every call, which costs as much as the product itself
at decode batch sizes: prepacked, a [16, 768] x [768, 4864] GEMM runs at 415 instead of 231 GFLOP/s on
the 2-core benchmark machine (little difference from M = 256 up).
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape {tuple(loaded.shape)} does not match the model's {tuple(param.shape)}")
    param.data.copy_(loaded)


# The batch size oneDNN tunes a prepacked weight's layout for: a typical decode step's rows.
PREPACK_BATCH_HINT = 32


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and _onednn_bf16_prepack_works()


@cache
def _onednn_bf16_prepack_works() -> bool:
    """Whether oneDNN's bf16 weight reorder runs on this CPU: it needs AVX-512 (bw, vl, dq) or
    AVX-NE-CONVERT, and raises on a plain AVX2 machine, where F.linear is the only way."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), PREPACK_BATCH_HINT)
    except RuntimeError:
        return False
    return True


class Linear(nn.Module):
    packed: torch.Tensor | None = None
    """The weight in oneDNN's layout once `prepack` ran (then `weight` may be an empty placeholder)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded)

    def prepack(self, keep_weight: bool) -> None:
        """Reorder the weight for oneDNN (see the module docstring). Without keep_weight the plain copy is
        freed: only a weight something else also uses (tied embeddings) needs to stay."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PREPACK_BATCH_HINT)
        if not keep_weight:
            self.weight.data = self.weight.data.new_empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def prepack_linears(model: nn.Module) -> int:
    """Prepack every Linear of a loaded model when its dtype and device gain from it; returns how many."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if not linears or not can_prepack(linears[0].weight.dtype, linears[0].weight.device):
        return 0
    # Parameters a non-Linear module uses too (a tied lm_head shares the embedding) keep their plain copy.
    shared = {
        id(p) for m in model.modules() if not isinstance(m, Linear) for p in m.parameters(recurse=False)
    }
    for linear in linears:
        linear.prepack(keep_weight=id(linear.weight) in shared)
    return len(linears)


class MergedLinear(Linear):
    """Several projections of the same input stored as one matrix: [out_0; out_1; ...].

    `shard_names` name the parts as the checkpoint does ("q", "k", "v" or 0, 1); a checkpoint that
    already ships the packed matrix loads it whole (shard_id None).
    """

    def __init__(self, in_features: int, out_sizes: list[int], shard_names: list, bias: bool = False):
        super().__init__(in_features, sum(out_sizes), bias)
        self.out_sizes = out_sizes
        offsets = [0]
        for size in out_sizes:
            offsets.append(offsets[-1] + size)
        self.shards = {name: (offsets[i], out_sizes[i]) for i, name in enumerate(shard_names)}

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            default_weight_loader(param, loaded)
            return
        start, size = self.shards[shard_id]
        target = param.data.narrow(0, start, size)
        if target.shape != loaded.shape:
            raise ValueError(
                f"shape {tuple(loaded.shape)} does not match the model's {tuple(target.shape)} for shard {shard_id!r}"
            )
        target.copy_(loaded)
