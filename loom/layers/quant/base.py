"""The LinearMethod interface: how a `Linear` turns its loaded float weight into what it multiplies with.

A layer loads the checkpoint's float weight through its weight loaders (packing q/k/v or gate/up is the
layer's business); once the whole checkpoint is in, its method's `process_weights` runs once (quantize,
prepack, free the float copy) and every `forward` calls the method's `apply`. The state a method makes
is registered on the layer as buffers, so it moves and counts with the model.

Every method has a plain-PyTorch twin (`reference()`): for a quantized scheme it dequantizes the same
quantized weight and calls `F.linear`; tests compare each method with its twin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from loom.kernels.decoder import StackLinear
    from loom.layers.linear import Linear


class LinearMethod:
    """A way to compute `x @ W.T + b` for a Linear layer. Stateless: what it needs lives on the layer."""

    name = "float"
    takes_prequantized = False
    """Whether `process_weights` uses a GPTQ / AWQ layer's own int4 values (`layer.prequantized`) as they
    are; for any other method the loader's values are dequantized into the float weight first."""

    def process_weights(self, layer: Linear, keep_weight: bool) -> None:
        """Convert `layer.weight` (float, fully loaded) into this method's form, once. Without keep_weight
        the float copy is freed; it stays only when another module uses the same tensor (tied embeddings)."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stack_linear(self, layer: Linear) -> StackLinear | None:
        """The layer as loom's native decoder stack multiplies it (loom/kernels/decoder.py), with the most
        rows for which that is exactly what `apply` computes; None where the stack cannot."""
        return None

    def reference(self) -> LinearMethod:
        """The plain-PyTorch twin tests compare this method with (for a quantized method: dequantize the
        same quantized weight, then F.linear)."""
        return self


class Unquantized(LinearMethod):
    """`F.linear` on the float weight: the reference every other method is measured against."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


UNQUANTIZED = Unquantized()


def free_weight(layer: Linear) -> None:
    """Drop the float weight's storage (the Parameter stays, empty, so named_parameters is unchanged)."""
    layer.weight.data = layer.weight.data.new_empty(0)


def as_2d(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a contiguous [tokens, in_features] matrix of `dtype`: the shape the CPU kernels take."""
    x = x.reshape(-1, x.shape[-1]).to(dtype)
    return x if x.is_contiguous() else x.contiguous()


def finish(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A kernel's [tokens, out_features] result back in x's dtype and leading shape, plus the bias."""
    out = out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias
