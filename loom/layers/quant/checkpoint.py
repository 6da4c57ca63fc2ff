"""Checkpoints quantized by someone else: GPTQ and AWQ int4, read into loom's int4 method exactly.

A checkpoint whose config.json has a `quantization_config` with `quant_method` "gptq" or "awq" ships each
quantized linear as packed 4-bit values, 4-bit zero points and fp16 scales per group of input channels,
dequantized as w = (q - z) * s. loom's int4 (int4.py) stores w = (q - 8) * scale + zero, so the same q
with scale = s and zero = (8 - z) * s is the same weight; the only change is rounding s and zero to
bfloat16 (loom's kernel reads bf16 scales), each by at most 2^-8 of itself: a weight moves by at most
2^-8 (|q - 8| + |8 - z|) s, 1/16 of a quantization step s (0.4% of a group's range, against int4's own
step of 1/15 of it). The 4-bit values themselves are taken as they are, so
loading does not quantize again (`--quantization int4` re-quantizing a float checkpoint would).

Layouts (both pack eight 4-bit values per int32, lowest nibble first):
- GPTQ (AutoGPTQ / GPTQModel, `checkpoint_format` "gptq" or "gptq_v2"): `qweight` [in / 8, out], packed
  along the input; `qzeros` [in / group, out / 8], packed along the output, stored as z - 1 in the
  original ("gptq") format and as z in "gptq_v2"; `scales` [in / group, out]; `g_idx` [in], each input
  channel's group. Only checkpoints whose groups are consecutive runs of input channels load (desc_act
  false, or a g_idx equal to i // group); act-order ones would need the input permuted.
- AWQ (AutoAWQ's GEMM `version`): `qweight` [in, out / 8] and `qzeros` [in / group, out / 8], packed
  along the output in the order 0, 2, 4, 6, 1, 3, 5, 7; `scales` [in / group, out].

Linears the checkpoint left in float (lm_head, modules_to_not_convert) load as float and are quantized by
loom's int4 at load like any float checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.config import QUANTIZATION_GROUP_SIZES
from loom.errors import InvalidRequest, ModelLoadError
from loom.layers.quant.int4 import COMPUTE_DTYPE

FORMATS = ("gptq", "awq")
# The tensors a quantized linear ships instead of `weight`.
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
# AWQ's packing: nibble j of an int32 holds output column 8 c + _AWQ_ORDER[j].
_AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@dataclass(frozen=True)
class CheckpointQuantization:
    method: str
    """"gptq" or "awq"."""
    group_size: int
    zeros_minus_one: bool = False
    """GPTQ's original format stores each zero point minus one."""

    @classmethod
    def from_config(cls, qc: dict | None, source: str = "config.json") -> CheckpointQuantization | None:
        """The `quantization_config` of a config.json; None if there is none. Raises ModelLoadError for a
        format loom cannot run exactly."""
        if not qc:
            return None
        method = str(qc.get("quant_method", "")).lower()
        if method not in FORMATS:
            raise ModelLoadError(
                f"{source}: quantization_config's quant_method {method!r} is not one loom loads "
                f"(it loads {FORMATS}); use the float checkpoint with --quantization int8 or int4"
            )
        bits = qc.get("bits", qc.get("w_bit"))
        group = qc.get("group_size", qc.get("q_group_size"))
        if bits != 4:
            raise ModelLoadError(f"{source}: a {bits}-bit {method} checkpoint; loom loads 4-bit ones")
        if group not in QUANTIZATION_GROUP_SIZES:
            raise ModelLoadError(
                f"{source}: {method} group_size {group}; loom's int4 kernel takes {QUANTIZATION_GROUP_SIZES}"
            )
        if method == "gptq":
            if qc.get("desc_act"):
                raise ModelLoadError(
                    f"{source}: an act-order GPTQ checkpoint (desc_act true); loom loads desc_act false"
                )
            fmt = qc.get("checkpoint_format", "gptq")
            if fmt not in ("gptq", "gptq_v2"):
                raise ModelLoadError(f"{source}: GPTQ checkpoint_format {fmt!r}; loom reads gptq and gptq_v2")
            return cls("gptq", group, zeros_minus_one=fmt == "gptq")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" or qc.get("zero_point") is False:
            raise ModelLoadError(
                f"{source}: AWQ version {version!r}, zero_point {qc.get('zero_point')}; loom reads the GEMM "
                "layout with zero points"
            )
        return cls("awq", group)

    def resolve(self, quantization: str | None, group_size: int) -> tuple[str, int]:
        """The engine's (quantization, group size) for this checkpoint: int4 at the checkpoint's group."""
        if quantization not in (None, "int4"):
            raise InvalidRequest(
                f"the checkpoint is {self.method} int4; quantization {quantization!r} cannot re-quantize "
                "it (leave quantization unset, or int4)",
                param="quantization",
            )
        return "int4", self.group_size

    def decode(self, tensors: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, ...]:
        """A linear's packed tensors -> (q uint8 [out, in], scale, zero [out, in / group] bf16) in loom's
        int4 convention (w = (q - 8) * scale + zero). Raises ModelLoadError if they do not fit."""
        missing = [s for s in ("qweight", "qzeros", "scales") if s not in tensors]
        if missing:
            raise ModelLoadError(
                f"{name}: the checkpoint has no {', '.join(missing)} beside its other tensors"
            )
        qweight, qzeros = tensors["qweight"].to(torch.int32), tensors["qzeros"].to(torch.int32)
        scales = tensors["scales"].float()  # [groups, out]
        groups, out = scales.shape
        try:
            if self.method == "gptq":
                q = _unpack(qweight.t())  # [in / 8, out], packed along the input -> [out, in]
                z = _unpack(qzeros)  # [groups, out]
                if self.zeros_minus_one:  # stored z - 1 in 4 bits: a zero point of 0 is stored as 15
                    z = (z + 1) & 0xF
            else:
                q = _unpack(qweight)[:, _awq_columns(qweight.shape[1])].t()
                z = _unpack(qzeros)[:, _awq_columns(qzeros.shape[1])]
        except RuntimeError as e:
            raise ModelLoadError(f"{name}: malformed {self.method} tensors: {e}") from e
        in_features = q.shape[1]
        if q.shape[0] != out or z.shape != (groups, out) or in_features != groups * self.group_size:
            raise ModelLoadError(
                f"{name}: {self.method} tensors of mismatched shapes (qweight {tuple(qweight.shape)}, "
                f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}, group {self.group_size})"
            )
        g_idx = tensors.get("g_idx")
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_features) // self.group_size):
            raise ModelLoadError(
                f"{name}: g_idx does not group consecutive input channels (an act-order checkpoint); "
                "loom loads desc_act false"
            )
        scale = scales.t().to(COMPUTE_DTYPE)  # [out, groups]
        zero = ((8 - z.float()) * scales).t().to(COMPUTE_DTYPE)
        return q.to(torch.uint8).contiguous(), scale.contiguous(), zero.contiguous()


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols] of eight nibbles each (lowest first) -> [rows, cols * 8] in 0..15."""
    rows, cols = packed.shape
    return ((packed.unsqueeze(-1) >> _SHIFTS) & 0xF).reshape(rows, cols * 8)


def _awq_columns(cols: int) -> torch.Tensor:
    """The column permutation that puts AWQ's nibble j of int32 c at output 8 c + _AWQ_ORDER[j]."""
    within = torch.tensor(_AWQ_ORDER).argsort()
    return (torch.arange(cols).unsqueeze(1) * 8 + within).reshape(-1)
