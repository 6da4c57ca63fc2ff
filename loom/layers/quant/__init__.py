"""Linear methods, one file per scheme, and the post-load hook that gives every Linear of a model its method.

- `Unquantized` (base.py): F.linear on the float weight, the reference;
- `OneDNNPrepacked` (onednn.py): CPU bfloat16 with the weight prepacked for oneDNN, where the CPU can;
- `Bf16Widened` (upcast.py): CPU bfloat16 where it cannot (no native bf16): bf16 weights widened to
  float32 by loom's own kernel (loom/kernels/gemv.c) for decode batches, per call for larger ones;
- `Float32Compute` (upcast.py): the same without a C compiler: a float32 copy of the weights;
- `Int8` (int8.py): weight-only int8, one scale per output channel;
- `Int4` (int4.py): weight-only int4, groups of 32-128 input channels with a scale and a zero point.

Each has a plain-PyTorch twin (`method.reference()`) that tests compare it with.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from loom.config import QUANTIZATION_GROUP_SIZES as GROUP_SIZES
from loom.config import QUANTIZATIONS
from loom.errors import InvalidRequest
from loom.kernels import cpu
from loom.layers.quant.base import UNQUANTIZED, LinearMethod, Unquantized
from loom.layers.quant.int4 import Int4, fill_weight
from loom.layers.quant.int8 import Int8
from loom.layers.quant.onednn import OneDNNPrepacked, can_prepack, gemm_dtype
from loom.layers.quant.upcast import Bf16Widened, Float32Compute

__all__ = [
    "GROUP_SIZES",
    "QUANTIZATIONS",
    "UNQUANTIZED",
    "Bf16Widened",
    "Float32Compute",
    "Int4",
    "Int8",
    "LinearMethod",
    "OneDNNPrepacked",
    "Unquantized",
    "can_prepack",
    "check_supported",
    "linear_method",
    "process_linears",
    "weight_bytes",
]

logger = logging.getLogger(__name__)

# torch's CPU kernels, by the quantization that needs them (torch < 2.6 lacks the int4 ones).
_KERNELS = {
    "int8": ("_weight_int8pack_mm",),
    "int4": ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
}


def check_supported(quantization: str, dtype: torch.dtype, device: torch.device) -> None:
    """Raise InvalidRequest (param "quantization") where this torch, device or dtype cannot run it."""
    if quantization not in QUANTIZATIONS:
        raise InvalidRequest(
            f"quantization must be one of {QUANTIZATIONS} or None, got {quantization!r}", param="quantization"
        )
    if device.type != "cpu":
        raise InvalidRequest(
            f"{quantization} quantization runs on CPU only (torch's CPU kernels); the engine is on {device}. "
            "Run without --quantization on this device, or with --device cpu",
            param="quantization",
        )
    if dtype not in (torch.float32, torch.bfloat16):
        raise InvalidRequest(
            f"{quantization} quantization needs a float32 or bfloat16 model, got {dtype}",
            param="quantization",
        )
    missing = [op for op in _KERNELS[quantization] if not hasattr(torch.ops.aten, op)]
    if missing:
        raise InvalidRequest(
            f"{quantization} quantization needs torch.ops.aten.{missing[0]}, which torch {torch.__version__} "
            "lacks (torch >= 2.6 has it)",
            param="quantization",
        )


def linear_method(
    quantization: str | None, group_size: int, dtype: torch.dtype, device: torch.device
) -> LinearMethod:
    """The method for a model's linears: the quantized one asked for, else the fastest float one."""
    if quantization is None:
        if can_prepack(dtype, device):
            return OneDNNPrepacked()
        if gemm_dtype(dtype, device.type) == dtype:
            return UNQUANTIZED
        return Bf16Widened() if cpu.available() else Float32Compute()
    check_supported(quantization, dtype, device)
    if quantization == "int8":
        return Int8()
    if group_size not in GROUP_SIZES:
        raise InvalidRequest(
            f"quantization_group_size must be one of {GROUP_SIZES}, got {group_size}",
            param="quantization_group_size",
        )
    return Int4(group_size)


def lm_head_method(quantization: str | None, body: LinearMethod) -> LinearMethod:
    """The output projection's method: int8 whenever the model is quantized, int4 included.

    Measured on the trained model (benchmarks/quant_accuracy.py): with an int4 lm_head, most of an int4
    model's error comes from it (mean KL to float32 7x that of the same model with an int8 lm_head), while
    int8 there is as good as float. It stays quantized because it is a large share of the weights a
    decode step reads (14% at the 271M shape; more with large vocabularies). Embeddings stay float: a
    lookup reads one row per token, so quantizing them would save memory but no time."""
    if quantization is None:
        return body
    return Int8()


def process_linears(
    model: nn.Module,
    method: LinearMethod,
    lm_head: LinearMethod | None = None,
    reference: bool = False,
) -> dict[str, int]:
    """The post-load hook: give every Linear of a loaded model its method and process its weights once.

    `lm_head` (default: the same method) is for the module named lm_head; `reference` uses each method's
    plain-PyTorch twin instead (for tests). Returns how many layers got each method."""
    from loom.layers.linear import Linear

    # Parameters a non-Linear module uses too (a tied lm_head shares the embedding) keep their float copy.
    shared = {
        id(p) for m in model.modules() if not isinstance(m, Linear) for p in m.parameters(recurse=False)
    }
    counts: dict[str, int] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear):
            continue
        chosen = lm_head if (lm_head is not None and name.split(".")[-1] == "lm_head") else method
        if reference:
            chosen = chosen.reference()
        if getattr(layer, "prequantized", None) and not chosen.takes_prequantized:
            fill_weight(layer)  # the loader left a GPTQ / AWQ layer's float weight unwritten
        try:
            chosen.process_weights(layer, keep_weight=id(layer.weight) in shared)
        except ValueError as e:
            raise InvalidRequest(f"cannot apply {chosen.name} to {name}: {e}", param="quantization") from e
        layer.__dict__.pop("prequantized", None)  # a GPTQ / AWQ checkpoint's values, now the method's
        layer.method = chosen
        counts[chosen.name] = counts.get(chosen.name, 0) + 1
    return counts


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (each storage counted once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
