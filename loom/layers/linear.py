"""Linear layers, including the packed ones (qkv_proj, gate_up_proj) that checkpoints may store split.

Each parameter carries a `weight_loader(param, tensor, shard_id)` the model loader calls, so packing is
the layer's business and the loader stays a name mapping. How a layer multiplies is its `method`
(loom/layers/quant/): plain `F.linear` until the loader, once the checkpoint is in, gives every layer the
method the engine config names (oneDNN-prepacked bf16, int8, int4) and lets it process the weight once.
"""

from __future__ import annotations

import torch
from torch import nn

from loom.layers.quant import UNQUANTIZED, LinearMethod


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape {tuple(loaded.shape)} does not match the model's {tuple(param.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    method: LinearMethod = UNQUANTIZED
    """How forward multiplies; set by `loom.layers.quant.process_linears` after loading."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method.name}"


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
