"""The Python side of decoder.c: a Llama-family decoder stack held as C structs of weight pointers, run
for a small bf16 batch in one call (`DecoderStack`).

Which models and batches take it is loom/models/cpu_decode.py's business; this file only lays out the
structs (they must match decoder.c field for field), checks what it is given, and calls.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from loom.kernels import cpu

_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


# loom_linear's weight kinds
_BF16, _INT8, _INT4 = 0, 1, 2


class _Linear(ctypes.Structure):
    _fields_ = [
        ("weight", _p),
        ("scale", _p),
        ("zero", _p),
        ("bias", _p),
        ("bias_after", _p),
        ("out_features", _i64),
        ("group_size", _i64),
        ("kind", _i32),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _p),
        ("post_attention_norm", _p),
        ("post_self_attn_norm", _p),
        ("post_mlp_norm", _p),
        ("qkv", _Linear),
        ("o", _Linear),
        ("gate_up", _Linear),
        ("down", _Linear),
        ("k_cache", _p),
        ("v_cache", _p),
    ]


class _Stack(ctypes.Structure):
    _fields_ = [
        ("num_layers", _i64),
        ("hidden", _i64),
        ("num_heads", _i64),
        ("num_kv_heads", _i64),
        ("head_dim", _i64),
        ("rotary_dim", _i64),
        ("intermediate", _i64),
        ("num_blocks", _i64),
        ("block_size", _i64),
        ("interleaved", _i32),
        ("eps", _f32),
        ("scale", _f32),
        ("layers", ctypes.POINTER(_Layer)),
        ("final_norm", _p),
    ]


@dataclass(slots=True)
class StackLinear:
    """One linear as its LinearMethod holds it: a bf16 weight in panels (`cpu.pack_panels`) with an
    optional float32 `bias` added before rounding (Bf16Widened); an int8 weight in panels with float32
    `scales` [N] (Int8), or an int4 one with bf16 `scales` and `zeros` in blocks of 8 output channels
    (`cpu.pack_int4`; Int4), each with an optional bf16 `bias_after` added after rounding."""

    weight: torch.Tensor
    scales: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    bias_after: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    group_size: int = 0


@dataclass(slots=True)
class StackLayer:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: StackLinear
    o: StackLinear
    gate_up: StackLinear
    down: StackLinear
    post_self_attn_norm: torch.Tensor | None = None
    """GLM-4's norm of the attention branch, else None."""
    post_mlp_norm: torch.Tensor | None = None


@dataclass(slots=True)
class StackShape:
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    interleaved: bool
    intermediate: int
    eps: float
    scale: float


def _linear(lin: StackLinear, n: int, k: int) -> _Linear:
    w = lin.weight
    kind = {torch.bfloat16: _BF16, torch.int8: _INT8, torch.uint8: _INT4}.get(w.dtype)
    int4_blocks = -(-n // cpu.INT4_BLOCK_N)
    shape = (
        (int4_blocks, k // cpu.INT4_BLOCK, 4 * cpu.INT4_BLOCK)
        if kind == _INT4
        else (-(-n // cpu.PANEL), k, cpu.PANEL)
    )
    if kind is None or w.shape != shape or not w.is_contiguous():
        raise ValueError(
            f"a stack linear takes a bf16 or int8 weight [{n}, {k}] in panels (cpu.pack_panels), "
            f"or an int4 one in blocks of {cpu.INT4_BLOCK_N} output channels (cpu.pack_int4)"
        )
    if (kind == _BF16) != (lin.scales is None) or (kind == _INT4) != (lin.zeros is not None):
        raise ValueError("int8 and int4 weights, and only they, come with scales; int4 ones with zeros too")
    groups = 1
    if kind == _INT4:
        if lin.group_size <= 0 or lin.group_size % cpu.INT4_BLOCK or k % lin.group_size:
            raise ValueError(
                f"an int4 stack linear's group size is a multiple of {cpu.INT4_BLOCK} dividing {k}"
            )
        groups = k // lin.group_size
    scale_shape, scale_dtype = (
        ((int4_blocks, groups, cpu.INT4_BLOCK_N), torch.bfloat16) if kind == _INT4 else ((n,), torch.float32)
    )
    for name, t, dtype, shape in (
        ("scales", lin.scales, scale_dtype, scale_shape),
        ("zeros", lin.zeros, scale_dtype, scale_shape),
        ("bias", lin.bias, torch.float32, (n,)),
        ("bias_after", lin.bias_after, torch.bfloat16, (n,)),
    ):
        if t is not None and (t.dtype != dtype or t.shape != shape or not t.is_contiguous()):
            raise ValueError(f"a stack linear's {name} is a contiguous {dtype} {list(shape)}")
    ptr = cpu._ptr
    return _Linear(
        w.data_ptr(), ptr(lin.scales), ptr(lin.zeros), ptr(lin.bias), ptr(lin.bias_after), n,
        lin.group_size, kind,
    )  # fmt: skip


class DecoderStack:
    """The decoder layers and final norm of one model, for `run`. Holds the tensors it points to."""

    def __init__(self, layers: list[StackLayer], final_norm: torch.Tensor, shape: StackShape):
        s = shape
        if s.head_dim % cpu.K_MULTIPLE or s.hidden % cpu.K_MULTIPLE or s.intermediate % cpu.K_MULTIPLE:
            raise ValueError(
                f"the stack needs hidden, intermediate and head_dim multiples of {cpu.K_MULTIPLE}"
            )
        if s.num_heads % s.num_kv_heads or s.num_heads // s.num_kv_heads > cpu.MAX_QUERIES_PER_KV:
            raise ValueError(f"the stack takes up to {cpu.MAX_QUERIES_PER_KV} query heads per kv head")
        if s.rotary_dim % 2 or s.rotary_dim > s.head_dim:
            raise ValueError("rotary_dim must be even and at most head_dim")
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        norms = [final_norm] + [n for ly in layers for n in _norms(ly) if n is not None]
        if any(n.dtype != torch.bfloat16 or n.shape != (s.hidden,) or not n.is_contiguous() for n in norms):
            raise ValueError(f"the stack's norm weights are contiguous bf16 [{s.hidden}]")
        self.shape = shape
        self._keep = (layers, final_norm)
        self._layers = (_Layer * len(layers))()
        for c, ly in zip(self._layers, layers, strict=True):
            c.input_norm, c.post_attention_norm = ly.input_norm.data_ptr(), ly.post_attention_norm.data_ptr()
            c.post_self_attn_norm = cpu._ptr(ly.post_self_attn_norm)
            c.post_mlp_norm = cpu._ptr(ly.post_mlp_norm)
            c.qkv = _linear(ly.qkv, q + 2 * kv, s.hidden)
            c.o = _linear(ly.o, s.hidden, q)
            c.gate_up = _linear(ly.gate_up, 2 * s.intermediate, s.hidden)
            c.down = _linear(ly.down, s.hidden, s.intermediate)
        self._stack = _Stack(
            len(layers), s.hidden, s.num_heads, s.num_kv_heads, s.head_dim, s.rotary_dim, s.intermediate,
            0, 0, int(s.interleaved), s.eps, s.scale, self._layers, final_norm.data_ptr(),
        )  # fmt: skip
        self._caches: list[torch.Tensor] | None = None

    def set_caches(self, caches: list[torch.Tensor]) -> None:
        """Each layer's paged cache, [2, num_kv_heads, num_blocks, block_size, head_dim] bf16."""
        s = self.shape
        if len(caches) != len(self._layers):
            raise ValueError(f"the stack has {len(self._layers)} layers, got {len(caches)} caches")
        first = caches[0].shape
        for c in caches:
            if (
                c.dtype != torch.bfloat16
                or not c.is_contiguous()
                or c.shape != first
                or c.shape[:2] != (2, s.num_kv_heads)
                or c.shape[-1] != s.head_dim
            ):
                raise ValueError(
                    f"the stack's caches are contiguous bf16 [2, {s.num_kv_heads}, blocks, block_size, "
                    f"{s.head_dim}], all of one shape"
                )
        for layer, c in zip(self._layers, caches, strict=True):
            layer.k_cache, layer.v_cache = c[0].data_ptr(), c[1].data_ptr()
        self._stack.num_blocks, self._stack.block_size = first[2], first[3]
        self._caches = caches

    def run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> torch.Tensor:
        """x [T, hidden] bf16 (one query row per token) through every layer and the final norm, writing
        each token's K/V to `slots` of the caches; cos, sin [T, rotary_dim / 2] bf16; block_table
        [T, max_blocks] and seq_lens [T] int64: the keys row t attends to, itself included."""
        if self._caches is None:
            raise RuntimeError("set_caches first")
        t, s = x.shape[0], self.shape
        half = s.rotary_dim // 2
        if x.dtype != torch.bfloat16 or x.shape != (t, s.hidden) or not x.is_contiguous():
            raise ValueError(f"the stack takes contiguous bf16 x [T, {s.hidden}]")
        for c in (cos, sin):
            if c.dtype != torch.bfloat16 or c.shape != (t, half) or not c.is_contiguous():
                raise ValueError(f"the stack takes contiguous bf16 cos and sin [{t}, {half}]")
        for name, v, dims in (
            ("slots", slots, 1),
            ("block_table", block_table, 2),
            ("seq_lens", seq_lens, 1),
        ):
            if v.dtype != torch.int64 or v.dim() != dims or len(v) != t or not v.is_contiguous():
                raise ValueError(f"the stack takes contiguous int64 {name} with a row per token")
        out = torch.empty_like(x)
        rc = cpu.library().loom_decode_stack(
            ctypes.byref(self._stack), x.data_ptr(), out.data_ptr(), t, cos.data_ptr(), sin.data_ptr(),
            slots.data_ptr(), block_table.data_ptr(), block_table.shape[1], seq_lens.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if rc == -2:
            raise ValueError("decode stack: a slot, sequence length or block id is outside the cache")
        if rc:
            raise MemoryError("loom's decode stack could not allocate its buffers")
        return out


def _norms(ly: StackLayer) -> tuple:
    return ly.input_norm, ly.post_attention_norm, ly.post_self_attn_norm, ly.post_mlp_norm
