"""Paged attention: the metadata one step's forward needs, and the plain-PyTorch backend.

The backend writes each new token's K/V into its slot of the paged cache, then attends:
decode tokens (one query each) in a few padded batches of similar context length (DecodeGroup) over
their block tables; prefill chunks one sequence at a time, causal over cached + new tokens. It runs on CPU and CUDA and is the reference
every faster backend is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loom.kernels import cpu
from loom.layers.quant.onednn import gemm_dtype


@dataclass(slots=True)
class PrefillSeq:
    start: int
    """Offset of the chunk's first token in the flattened batch."""
    num_new: int
    num_context: int
    """Tokens of this sequence already in the cache before the chunk."""
    block_ids: torch.Tensor
    """Blocks holding its first num_context + num_new tokens (a CPU or device long tensor)."""


@dataclass(slots=True)
class DecodeGroup:
    """Decode sequences of similar length, gathered and attended as one padded batch. Padding every decode
    to the longest context of the step would gather (and multiply) up to twice the keys needed."""

    token_idx: torch.Tensor
    """[n] positions in the batch of these single-token queries."""
    block_table: torch.Tensor
    """[n, max_blocks] block ids of each sequence, padded with 0."""
    key_mask: torch.Tensor
    """[1, n, 1, max_blocks * block_size] True where a key position is inside the sequence."""
    seq_lens: torch.Tensor
    """[n] keys of each sequence, this step's included (a CPU long tensor)."""


@dataclass(slots=True)
class AttentionMetadata:
    """Where one step's tokens go in the cache and what each attends to. Built once per step by the
    runner and passed explicitly through the model (no global forward context)."""

    slot_mapping: torch.Tensor
    """[num_tokens] cache slot (block_id * block_size + offset) of each new token."""
    block_size: int
    decodes: list[DecodeGroup] | None = None
    prefills: list[PrefillSeq] | None = None


class KVCache:
    """The preallocated paged cache of one layer: [2, num_kv_heads, num_blocks, block_size, head_dim].

    Head-major, so gathering a batch's blocks (`k[:, block_table]`) gives [KvH, B, L, D] with each
    sequence's keys contiguous per head, ready for a batched matmul without another copy (3x faster
    decode attention on CPU than the block-major layout).
    """

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.k = tensor[0]
        self.v = tensor[1]
        # Flat [num_kv_heads, num_slots, head_dim] views for slot writes.
        self.k_flat = self.k.flatten(1, 2)
        self.v_flat = self.v.flatten(1, 2)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.gqa = num_heads != num_kv_heads

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].
        Returns [num_tokens, num_heads * head_dim]."""
        cache.k_flat.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        cache.v_flat.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        out = torch.empty_like(q)
        for group in meta.decodes or ():
            out[group.token_idx] = self._decode(q[group.token_idx], cache, group, meta.block_size)
        for seq in meta.prefills or ():
            end = seq.start + seq.num_new
            out[seq.start : end] = self._prefill(
                q[seq.start : end], k[seq.start : end], v[seq.start : end], seq, cache
            )
        return out.view(q.shape[0], -1)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        # q: [B, H, Lq, D]; k, v: [B, KvH, Lk, D]
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=self.gqa, **kwargs)

    def _decode(self, q: torch.Tensor, cache: KVCache, group: DecodeGroup, block_size: int) -> torch.Tensor:
        if (
            cpu.fused(q, tokens=q.shape[0])
            and cache.k.dtype == q.dtype
            and cache.k.is_contiguous()
            and self.head_dim % cpu.K_MULTIPLE == 0
            and self.num_heads // self.num_kv_heads <= cpu.MAX_QUERIES_PER_KV
        ):
            # loom's kernel reads the keys and values in place through the block table; the code
            # below is its twin.
            return cpu.attention_decode(
                q.contiguous(), cache.k, cache.v, group.block_table, group.seq_lens, self.scale
            )
        # Grouped matmuls instead of SDPA: with a padding mask and a batch of single queries, CPU SDPA
        # falls back to a slow path (6x slower in bf16 at batch 48); this keeps K/V unrepeated for GQA
        # and does the softmax in float32 like HF's eager attention.
        num_seqs, max_blocks = group.block_table.shape
        shape = (self.num_kv_heads, num_seqs, max_blocks * block_size, self.head_dim)
        # index_select over the flattened table: same tensor as advanced indexing, 3-5x faster on CPU.
        blocks = group.block_table.flatten()
        k = cache.k.index_select(1, blocks).view(shape)  # [KvH, B, L, D]
        v = cache.v.index_select(1, blocks).view(shape)
        q_per_kv = self.num_heads // self.num_kv_heads
        q = q.view(num_seqs, self.num_kv_heads, q_per_kv, self.head_dim).transpose(0, 1)  # [KvH, B, G, D]
        dtype = q.dtype
        if gemm_dtype(dtype, q.device.type) != dtype:
            # A CPU without native bf16 (AVX2) runs bf16 batched matmuls on a slow path: in float32 these
            # two are 4-7x faster, the casts included (a batch-1 decode step of the 271M Llama: -15%).
            q, k, v = q.float(), k.float(), v.float()
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale  # [KvH, B, G, L]
        scores.masked_fill_(~group.key_mask, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1).to(q.dtype), v)  # [KvH, B, G, D]
        return out.transpose(0, 1).reshape(num_seqs, self.num_heads, self.head_dim).to(dtype)

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: PrefillSeq, cache: KVCache
    ) -> torch.Tensor:
        q = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if seq.num_context == 0:
            k = k.transpose(0, 1).unsqueeze(0)
            v = v.transpose(0, 1).unsqueeze(0)
            out = self._sdpa(q, k, v, is_causal=True)
        else:
            total = seq.num_context + seq.num_new
            # [1, KvH, total, D]
            k = cache.k[:, seq.block_ids].flatten(1, 2)[:, :total].unsqueeze(0)
            v = cache.v[:, seq.block_ids].flatten(1, 2)[:, :total].unsqueeze(0)
            # Query i (absolute position num_context + i) sees keys 0 .. num_context + i.
            mask = torch.ones(seq.num_new, total, dtype=torch.bool, device=q.device).tril(seq.num_context)
            out = self._sdpa(q, k, v, attn_mask=mask)
        return out.squeeze(0).transpose(0, 1)  # [n, H, D]
