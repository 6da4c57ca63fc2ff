"""loom's own CPU kernels (gemv.c, attention.c, elementwise.c, decoder.c): how they are built and loaded,
and the Python side of each (argument checks, output allocation, one ctypes call).

The linear kernels multiply bf16, int8 or int4 weights by any number of rows. A decode step with a few
sequences streams every weight from memory once, so its speed is the weights' bytes over the memory
bandwidth, if the kernel reads them as stored; a prefill chunk reuses each weight for many rows, so its
speed is the FMA rate. On a CPU without native bf16 (AVX2) torch has neither: a bf16 weight runs fastest
as a float32 copy (twice the bytes) through its float32 GEMM, and `_weight_int8pack_mm` is
compute-bound. gemv.c keeps bf16 and int8 weights in panels of 16 output channels (`pack_panels`) and
widens them in registers, 6 rows to a tile; each output is one FMA chain over the input channels, the
same for any batch. The int4 kernel quantizes the input to int8 and multiplies in integers (gemv.c says
why), blocks of 8 output channels interleaved so that the scales and outputs are vectors too; it beats
dequantizing to float32 at every batch size measured (1-512 rows), and each row's result is the same in
any batch as well.
`python benchmarks/cpu_kernels.py --threads 1` on the 2-vCPU AVX2 VM: the 12 layers of the 89M Llama,
weights cold in memory as in a real step, ms per pass over all linears (median of 7 rounds; the box was
in a slow phase, torch's columns 10-40% above the previous session's run; "float32"
is torch's GEMM on a float32 copy of the weight, the fastest torch has for a bf16 weight here):

| rows | float32 copy, F.linear | loom bf16 | torch int8 | loom int8 | torch int4 g32 | loom int4 g32 |
|---:|---:|---:|---:|---:|---:|---:|
| 1 | 37.1 | 16.3 | 25.1 | 11.7 | 16.0 | 9.5 |
| 4 | 112.7 | 29.0 | 36.0 | 35.3 | 28.7 | 15.7 |
| 16 | 159.8 | 87.7 | 154.3 | 79.2 | 133.8 | 38.3 |
| 64 | 258.7 | 220.4 | 401.9 | 202.9 | 438.0 | 171.1 |
| 128 | 393.2 | 304.5 | 622.7 | 317.1 | 686.8 | 278.0 |
| 256 | 683.7 | 670.8 | 1242.6 | 636.1 | 1331.3 | 578.9 |

The fused ops (decode attention, RMSNorm, SiLU-and-mul, rotary) take batches of up to `MAX_ROWS` tokens
(`fused`).

How the library is built and loaded: loom/kernels/build.py.
"""

from __future__ import annotations

import torch

from loom.kernels.build import available, library

# The fused kernels (attention, norms) read 8 channels at a time.
K_MULTIPLE = 8
# The most rows the fused ops take.
MAX_ROWS = 64
# Output channels per panel of a bf16 or int8 weight (NR in gemv.c).
PANEL = 16
# bf16 panels hold channel j in the low half of 32-bit lane j and channel j + 8 in the high half.
_BF16_LANES = torch.tensor([c for j in range(8) for c in (j, j + 8)])
# The int4 kernel's unit: 32 input channels (a group is a whole number of them) of 8 output channels.
INT4_BLOCK = 32
INT4_BLOCK_N = 8
# Query heads per kv head the attention kernel handles (MAX_G in attention.c).
MAX_QUERIES_PER_KV = 16


def fused(x: torch.Tensor, tokens: int | None = None) -> bool:
    """Whether a layer should run its fused kernel (norm, activation, rotary, decode attention) on x: a
    bf16 CPU tensor of a decode-sized batch (`tokens`, default x's rows) where the kernels run. float32 keeps the torch twins, the
    reference loom's float32 outputs match HF transformers token for token with (a fused RMSNorm
    differs from torch's in the last bit of most float32 outputs; in bf16 it is bit-identical)."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and (x.numel() // x.shape[-1] if tokens is None else tokens) <= MAX_ROWS
        and available()
    )


_KIND = {torch.float32: 0, torch.bfloat16: 1}
_F32_VIA_BF16 = 2
_WEIGHTS = {torch.bfloat16: "loom_gemv_bf16", torch.int8: "loom_gemv_int8"}


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """A bf16 or int8 weight [N, K] in the kernels' layout: panels of 16 output channels,
    [ceil(N / 16), K, 16], the last one padded with zeros (bf16 lanes interleaved as gemv.c reads them)."""
    if w.dtype not in _WEIGHTS or w.dim() != 2:
        raise ValueError(f"pack_panels takes a bf16 or int8 weight [N, K], got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    p = -(-n // PANEL)
    padded = w.new_zeros(p * PANEL, k)
    padded[:n] = w
    panels = padded.view(p, PANEL, k).transpose(1, 2)
    if w.dtype == torch.bfloat16:
        panels = panels[..., _BF16_LANES]
    return panels.contiguous()


def unpack_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """`pack_panels`' inverse: the weight [n, K]."""
    if panels.dtype == torch.bfloat16:
        panels = panels[..., torch.argsort(_BF16_LANES)]
    p, k, _ = panels.shape
    return panels.transpose(1, 2).reshape(p * PANEL, k)[:n].contiguous()


def matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    n: int,
    scales: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    via_bf16: bool = False,
) -> torch.Tensor:
    """x [..., K] times the weight [n, K] (bf16 or int8, as `pack_panels` lays it out) transposed, times
    `scales` [n], plus `bias` [n]: [..., n] in x's dtype.

    x is float32 or bf16, contiguous; scales and bias are float32. One call does it all (widening x,
    rounding the result), since each extra torch op costs about as much as the kernel at decode sizes.
    `via_bf16` (int8's arithmetic for a float32 x) rounds x to bf16 values first and the result (before
    the bias) to bf16 values after. Each output is the same FMA chain whatever the number of rows."""
    k = w.shape[1] if w.dim() == 3 else -1
    if w.dtype not in _WEIGHTS or w.shape != (-(-n // PANEL), k, PANEL) or not w.is_contiguous():
        raise ValueError(
            f"the kernels take a bf16 or int8 weight [{n}, K] in panels (pack_panels), "
            f"got {w.dtype} {tuple(w.shape)}"
        )
    if x.dtype not in _KIND or not x.is_contiguous() or x.shape[-1] != k:
        raise ValueError(
            f"the kernels take a contiguous float32 or bf16 x [..., {k}], got {x.dtype} {tuple(x.shape)}"
        )
    for name, v in (("scales", scales), ("bias", bias)):
        if v is not None and (v.dtype != torch.float32 or v.shape != (n,) or not v.is_contiguous()):
            raise ValueError(f"the kernels take contiguous float32 {name} [{n}]")
    if via_bf16 and bias is not None:
        raise ValueError("via_bf16 rounds before the bias: add the bias after")
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    kind = _KIND[x.dtype]
    if via_bf16 and kind == _KIND[torch.float32]:
        kind = _F32_VIA_BF16
    rc = getattr(library(), _WEIGHTS[w.dtype])(
        x.data_ptr(), kind, w.data_ptr(), _ptr(scales), _ptr(bias), out.data_ptr(), kind,
        x.numel() // k, n, k, torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise MemoryError("loom's linear kernel could not allocate its input buffer")
    return out


def matmul_int4(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    n: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] times the int4 weight of `n` output channels in loom's layout (`pack_int4`: w
    [ceil(n / 8), K / 32, 128] uint8, scales and zeros [ceil(n / 8), K / group_size, 8] bf16), plus `bias`
    [n]: [..., n] in x's dtype (float32 or bf16). x is quantized to int8 per 32 values first (scale
    max|x| / 127, round half to even), as llama.cpp's q8_0: the result is the exact product of the two
    dequantized operands, up to float32 summation order; each row's the same in any batch."""
    blocks = -(-n // INT4_BLOCK_N)
    if w.dim() != 3 or w.shape[0] != blocks or w.shape[2] != 4 * INT4_BLOCK:
        raise ValueError(
            f"the int4 kernel takes a weight [{blocks}, K / {INT4_BLOCK}, {4 * INT4_BLOCK}] (pack_int4)"
        )
    k = w.shape[1] * INT4_BLOCK
    if x.dtype not in _KIND or not x.is_contiguous() or x.shape[-1] != k:
        raise ValueError(
            f"the kernels take a contiguous float32 or bf16 x [..., {k}], got {x.dtype} {tuple(x.shape)}"
        )
    if w.dtype != torch.uint8 or not w.is_contiguous() or group_size % INT4_BLOCK or k % group_size:
        raise ValueError(
            f"the int4 kernel takes a contiguous uint8 weight and a group size that is a multiple of "
            f"{INT4_BLOCK} and divides K"
        )
    shape = (blocks, k // group_size, INT4_BLOCK_N)
    for name, v in (("scales", scales), ("zeros", zeros)):
        if v.dtype != torch.bfloat16 or v.shape != shape or not v.is_contiguous():
            raise ValueError(f"the int4 kernel takes contiguous bf16 {name} {list(shape)}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"the kernels take a contiguous float32 bias [{n}]")
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    kind = _KIND[x.dtype]
    rows = x.numel() // k
    rc = library().loom_gemv_int4(
        x.data_ptr(), kind, w.data_ptr(), scales.data_ptr(), zeros.data_ptr(), group_size, _ptr(bias),
        out.data_ptr(), kind, rows, n, k, torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise MemoryError("loom's int4 kernel could not allocate its input buffer")
    return out


def pack_int4(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q uint8 [N, K] in 0..15 (K % 32 == 0) with its bf16 scales and zeros [N, K / G] in loom's int4
    layout (gemv.c): output channels in blocks of 8, the last padded (q 8, scale and zero 0); w
    [ceil(N / 8), K / 32, 128], byte 32 j + 4 c + i of input block b holding channel c's value 32 b + 4 j + i
    in its low nibble and 32 b + 16 + 4 j + i in its high one; scales and zeros [ceil(N / 8), K / G, 8]."""
    n, k = q.shape
    if k % INT4_BLOCK:
        raise ValueError(f"pack_int4 takes rows of a multiple of {INT4_BLOCK} values")
    pad = -n % INT4_BLOCK_N
    if pad:
        q = torch.cat([q, q.new_full((pad, k), 8)])
        scales, zeros = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scales, zeros))
    blocks = (n + pad) // INT4_BLOCK_N
    # [block, c, b, (low, high), j, i] -> [block, b, j, c, i], low | high << 4
    v = q.reshape(blocks, INT4_BLOCK_N, k // INT4_BLOCK, 2, 4, 4).permute(0, 2, 3, 4, 1, 5)
    w = (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(blocks, k // INT4_BLOCK, 4 * INT4_BLOCK).contiguous()

    def by_block(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(blocks, INT4_BLOCK_N, -1).transpose(1, 2).contiguous()

    return w, by_block(scales), by_block(zeros)


def unpack_int4(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack_int4` undone: q [n, K], scales and zeros [n, K / G]."""
    blocks, nb, _ = w.shape
    v = torch.stack([w & 0x0F, w >> 4], dim=2).reshape(blocks, nb, 2, 4, INT4_BLOCK_N, 4)
    q = v.permute(0, 4, 1, 2, 3, 5).reshape(blocks * INT4_BLOCK_N, nb * INT4_BLOCK)

    def by_channel(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(blocks * INT4_BLOCK_N, -1)[:n]

    return q[:n], by_channel(scales), by_channel(zeros)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence over the paged cache: q [S, H, D]; caches [KvH, num_blocks, block_size, D]
    of q's dtype (float32 or bf16); block_table [S, max_blocks] and seq_lens [S] int64. Returns [S, H, D]."""
    s, h, d = q.shape
    kvh, num_blocks, block_size, _ = k_cache.shape
    if q.dtype not in _KIND or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or d % K_MULTIPLE:
        raise ValueError("attention_decode takes float32 or bf16 q and caches of its dtype, D % 8 == 0")
    if (
        not (q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous())
        or v_cache.shape != k_cache.shape
    ):
        raise ValueError("attention_decode takes contiguous q and caches of one shape")
    if h % kvh or h // kvh > MAX_QUERIES_PER_KV or k_cache.shape[-1] != d:
        raise ValueError(f"attention_decode takes up to {MAX_QUERIES_PER_KV} query heads per kv head")
    if (
        block_table.dtype != torch.int64
        or seq_lens.dtype != torch.int64
        or len(block_table) != s
        or len(seq_lens) != s
    ):
        raise ValueError("attention_decode takes an int64 block_table [S, max_blocks] and seq_lens [S]")
    block_table, seq_lens = block_table.contiguous(), seq_lens.contiguous()
    out = torch.empty_like(q)
    rc = library().loom_attention_decode(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_table.data_ptr(), seq_lens.data_ptr(),
        out.data_ptr(), _KIND[q.dtype], s, h, kvh, d, num_blocks, block_size, block_table.shape[1], scale,
        torch.get_num_threads(),
    )  # fmt: skip
    if rc == -2:
        raise ValueError(
            "attention_decode: every sequence needs 1 .. max_blocks * block_size keys, in blocks of the cache"
        )
    if rc:
        raise MemoryError("loom's attention kernel could not allocate its buffers")
    return out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [..., K] (float32 or bf16, contiguous) with weight [K] of its dtype, as
    loom.layers.norm.RMSNorm computes it; with `residual`, returns (norm(x + residual), x + residual)."""
    k = x.shape[-1]
    if x.dtype not in _KIND or weight.dtype != x.dtype or weight.shape != (k,) or not x.is_contiguous():
        raise ValueError("rms_norm takes a contiguous float32 or bf16 x and a weight [K] of its dtype")
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or not residual.is_contiguous()
    ):
        raise ValueError("rms_norm takes a contiguous residual of x's shape and dtype")
    y = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else None
    library().loom_rms_norm(
        x.data_ptr(), _ptr(residual), weight.data_ptr(), y.data_ptr(), _ptr(summed), _KIND[x.dtype],
        x.numel() // k, k, eps, torch.get_num_threads(),
    )  # fmt: skip
    return y if summed is None else (y, summed)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] [..., 2 I] (float32 or bf16, contiguous): [..., I]."""
    if x.dtype not in _KIND or not x.is_contiguous() or x.shape[-1] % 2:
        raise ValueError("silu_and_mul takes a contiguous float32 or bf16 x of even width")
    i = x.shape[-1] // 2
    y = torch.empty(*x.shape[:-1], i, dtype=x.dtype)
    library().loom_silu_and_mul(
        x.data_ptr(), y.data_ptr(), _KIND[x.dtype], x.numel() // (2 * i), i, torch.get_num_threads()
    )
    return y


def rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool
) -> torch.Tensor:
    """Rotary embedding of x [T, heads, head_dim] (float32 or bf16; each token's heads contiguous, tokens
    at any stride: a column slice of the qkv projection) with cos, sin [T, rotary_dim / 2] of x's dtype,
    as loom.layers.rotary.RotaryEmbedding._apply computes it. Returns a new contiguous tensor."""
    t, heads, head_dim = x.shape
    if x.dtype not in _KIND or x.stride(2) != 1 or x.stride(1) != head_dim:
        raise ValueError(
            "rotary takes float32 or bf16 x [T, heads, head_dim] with each token's heads contiguous"
        )
    half = rotary_dim // 2
    for c in (cos, sin):
        if c.dtype != x.dtype or c.shape != (t, half) or not c.is_contiguous():
            raise ValueError(f"rotary takes contiguous cos and sin [{t}, {half}] of x's dtype")
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and at most head_dim, got {rotary_dim}")
    y = torch.empty(t, heads, head_dim, dtype=x.dtype)
    library().loom_rotary(
        x.data_ptr(), x.stride(0), y.data_ptr(), cos.data_ptr(), sin.data_ptr(), _KIND[x.dtype],
        t, heads, head_dim, rotary_dim, int(interleaved), torch.get_num_threads(),
    )  # fmt: skip
    return y
