"""loom's fused CPU kernels (attention.c, elementwise.c) against their plain-PyTorch twins, and the layers
that choose them: bf16 decode-sized batches run the kernel, everything else the twin.

In bf16 the twins' arithmetic is followed step by step (same roundings): SiLU-and-mul must be
bit-identical; RMSNorm sums its squares in its own float32 order, which flips a bf16 rounding in about
one output in ten thousand (measured: 0.01-0.04%), so at most 0.1% may differ, each by two bf16 ulps at
most. Attention sums in float32 in its own order (and, unlike the twin on an AVX2 CPU, keeps float32
scores), so it is held to a bf16 rounding of a float64 reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom.kernels import cpu
from loom.layers.activation import SiluAndMul
from loom.layers.attention import Attention, DecodeGroup, KVCache
from loom.layers.norm import RMSNorm


def twin_norm(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None = None):
    """RMSNorm.forward's torch code (what runs where the kernel does not)."""
    if residual is None:
        return norm._norm(x)
    s = x + residual
    return norm._norm(s), s


@pytest.mark.parametrize("rows", [1, 3, cpu.MAX_ROWS])
@pytest.mark.parametrize("width", [8, 768, 100])
def test_rms_norm_matches_its_twin_in_bf16(rows, width):
    gen = torch.Generator().manual_seed(rows + width)
    norm = RMSNorm(width, eps=1e-5)
    norm.weight.data = torch.randn(width, generator=gen).bfloat16()
    x = (torch.randn(rows, width, generator=gen) * 3).bfloat16()
    res = torch.randn(rows, width, generator=gen).bfloat16()
    assert_nearly_identical(cpu.rms_norm(x, norm.weight.data, 1e-5), twin_norm(norm, x))
    y, s = cpu.rms_norm(x, norm.weight.data, 1e-5, res)
    ty, ts = twin_norm(norm, x, res)
    assert torch.equal(s, ts)  # the residual sum is one rounding, as torch's
    assert_nearly_identical(y, ty)
    # the layer takes the kernel here, and gives the same
    assert torch.equal(norm(x, res)[0], y)


def assert_nearly_identical(ours: torch.Tensor, twin: torch.Tensor) -> None:
    differ = ours != twin
    assert differ.float().mean().item() <= 0.001
    rel = (ours.float() - twin.float()).abs() / twin.float().abs().clamp_min(1e-30)
    assert (rel[differ] <= 2 * 2**-7).all()


def test_silu_and_mul_is_bit_identical_to_its_twin_in_bf16():
    x = (torch.randn(5, 2 * 2432, generator=torch.Generator().manual_seed(0)) * 4).bfloat16()
    gate, up = x.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    assert torch.equal(cpu.silu_and_mul(x), expected)
    assert torch.equal(SiluAndMul()(x), expected)


def test_layers_keep_the_twin_for_float32_and_large_batches():
    assert not cpu.fused(torch.zeros(1, 64))  # float32: the HF-exact reference path
    assert cpu.fused(torch.zeros(cpu.MAX_ROWS, 64, dtype=torch.bfloat16))
    assert not cpu.fused(torch.zeros(cpu.MAX_ROWS + 1, 64, dtype=torch.bfloat16))  # a prefill chunk
    # [tokens, heads, head_dim]: the tokens count, not tokens x heads
    assert cpu.fused(torch.zeros(16, 12, 64, dtype=torch.bfloat16), tokens=16)


def _cache(kvh: int, blocks: int, block_size: int, d: int, dtype: torch.dtype, gen) -> KVCache:
    return KVCache(torch.randn(2, kvh, blocks, block_size, d, generator=gen).to(dtype))


@pytest.mark.parametrize("heads,kv_heads", [(12, 4), (4, 4), (16, 1)])
def test_decode_attention_matches_float64_over_the_block_table(heads, kv_heads):
    gen = torch.Generator().manual_seed(heads)
    d, block_size = 64, 16
    cache = _cache(kv_heads, 24, block_size, d, torch.bfloat16, gen)
    lens = [1, 16, 17, 70]  # one key; a full block; one past it; several blocks
    tables = [[5], [3], [7, 2], [9, 0, 11, 4, 23]]
    width = max(map(len, tables))
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(lens), heads, d, generator=gen).bfloat16()
    out = cpu.attention_decode(q, cache.k, cache.v, block_table, torch.tensor(lens), 0.125)
    g = heads // kv_heads
    for s, n in enumerate(lens):
        k = cache.k[:, block_table[s]].flatten(1, 2)[:, :n].double()  # [KvH, n, D]
        v = cache.v[:, block_table[s]].flatten(1, 2)[:, :n].double()
        qs = q[s].double().view(kv_heads, g, d)
        expected = ((qs @ k.transpose(-1, -2)) * 0.125).softmax(-1) @ v  # [KvH, G, D]
        torch.testing.assert_close(out[s].double(), expected.reshape(heads, d), atol=2e-2, rtol=2**-7)
    # The layer takes the kernel for bf16 and agrees with its own torch twin.
    attn = Attention(heads, kv_heads, d, 0.125)
    key_pos = torch.arange(width * block_size)
    group = DecodeGroup(
        token_idx=torch.arange(len(lens)),
        block_table=block_table,
        key_mask=(key_pos < torch.tensor(lens).unsqueeze(1))[None, :, None, :],
        seq_lens=torch.tensor(lens),
    )
    ours = attn._decode(q, cache, group, block_size)
    assert torch.equal(ours, out)
    twin = attn._decode(q.float(), _float_cache(cache), group, block_size).bfloat16()
    torch.testing.assert_close(ours.float(), twin.float(), atol=2e-2, rtol=2**-7)


def _float_cache(cache: KVCache) -> KVCache:
    return KVCache(cache.tensor.float())


def test_decode_attention_refuses_what_it_cannot_read():
    gen = torch.Generator().manual_seed(0)
    cache = _cache(2, 4, 16, 64, torch.bfloat16, gen)
    q = torch.randn(1, 4, 64).bfloat16()
    table = torch.tensor([[1]])
    with pytest.raises(ValueError, match="1 .. max_blocks"):
        cpu.attention_decode(q, cache.k, cache.v, table, torch.tensor([17]), 1.0)  # more keys than blocks
    with pytest.raises(ValueError, match="1 .. max_blocks"):
        cpu.attention_decode(q, cache.k, cache.v, table, torch.tensor([0]), 1.0)
    with pytest.raises(ValueError, match="in blocks of the cache"):
        cpu.attention_decode(q, cache.k, cache.v, torch.tensor([[4]]), torch.tensor([3]), 1.0)  # 4 blocks
    with pytest.raises(ValueError, match="dtype"):
        cpu.attention_decode(q.float(), cache.k, cache.v, table, torch.tensor([3]), 1.0)
    with pytest.raises(ValueError, match="int64"):
        cpu.attention_decode(q, cache.k, cache.v, table.int(), torch.tensor([3]), 1.0)


@pytest.mark.parametrize("interleaved,rotary_dim", [(False, 64), (True, 64), (True, 32)])
def test_rotary_is_bit_identical_to_its_twin_in_bf16(interleaved, rotary_dim):
    """q and k are column slices of the qkv projection (tokens strided); the kernel reads them in place.
    Each product and sum is rounded to bf16 as torch rounds it, so the result must be the same bits."""
    from loom.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(64, rotary_dim, 512, 10000.0, interleaved=interleaved)
    gen = torch.Generator().manual_seed(rotary_dim)
    qkv = torch.randn(5, 12 * 64 + 2 * 4 * 64, generator=gen).bfloat16()
    q, k, _ = qkv.split([12 * 64, 4 * 64, 4 * 64], dim=-1)
    q, k = q.view(5, 12, 64), k.view(5, 4, 64)
    positions = torch.tensor([0, 1, 7, 300, 511])
    ours = rope(positions, q, k)
    cos, sin = rope.cos_sin(positions, torch.bfloat16)
    for got, x in zip(ours, (q, k), strict=True):
        assert got.is_contiguous()
        assert torch.equal(got, rope._apply(x, cos, sin))
