"""Small bf16 batches on CPU through every decoder layer in one native call.

A decode step of a small model on CPU spends as long calling its ~10 kernels per layer from Python as
the kernels take (0.5-1 ms a layer here: module calls, argument checks, allocations, ctypes), so a small
bf16 batch (up to the fused ops' `cpu.MAX_ROWS` rows) runs them from one C function instead
(loom/kernels/decoder.c). The modules are its twin:

- a batch of decode tokens gets the same arithmetic on the same values: the outputs and KV writes are
  bit-identical to the modules' (tests/kernels/test_decoder.py);
- a prefill chunk in the batch (a draft verification, a short prompt) runs as one decode row per token,
  each attending to its own prefix, where the modules run SDPA over the chunk: the same up to float32
  summation order. Every row's result depends only on its own token and the cache, never on the batch
  around it, so a verified draft token gets the numbers plain decoding would give it, and greedy output
  is the same with speculation in bf16 as without.

Larger batches, float32 models and GPUs take the modules.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from loom.kernels import cpu
from loom.kernels.decoder import DecoderStack, StackLayer, StackShape
from loom.layers.activation import SiluAndMul
from loom.layers.attention import Attention, AttentionMetadata, KVCache
from loom.layers.norm import RMSNorm
from loom.layers.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)


def stack_layer(
    layer: nn.Module, post_self_attn_norm: RMSNorm | None = None, post_mlp_norm: RMSNorm | None = None
) -> StackLayer | None:
    """A Llama-shaped decoder layer (input_layernorm, self_attn.{qkv_proj, rotary_emb, attn, o_proj},
    post_attention_layernorm, mlp.{gate_up_proj, act, down_proj}) as the stack runs it, or None where a
    part is not the stock module or its linear method has no stack form. The caller vouches that the
    layer's forward composes them as LlamaDecoderLayer's does (GLM-4: plus its two extra norms)."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = [layer.input_layernorm, layer.post_attention_layernorm, post_self_attn_norm, post_mlp_norm]
    if any(n is not None and type(n) is not RMSNorm for n in norms):
        return None
    if (
        type(attn.attn) is not Attention
        or type(attn.rotary_emb) is not RotaryEmbedding
        or type(mlp.act) is not SiluAndMul
    ):
        return None
    linears = [
        lin.method.stack_linear(lin) for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    ]
    if None in linears:
        return None
    weights = [None if n is None else n.weight.data for n in norms]
    return StackLayer(weights[0], weights[1], *linears, weights[2], weights[3])


class NativeDecode:
    """The decoder stack of one LlamaModel (or a model built on it) as a `DecoderStack`, and the check,
    per batch, that the stack computes what the modules would."""

    def __init__(self, model: nn.Module):
        self.stack: DecoderStack | None = None
        self._caches: list[KVCache] | None = None
        try:
            self.stack, self.rotary = self._build(model)
        except _NotEligible as e:
            logger.debug("native decode stack off: %s", e)

    @staticmethod
    def _build(model: nn.Module) -> tuple[DecoderStack, RotaryEmbedding]:
        weight = model.embed_tokens.weight
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            raise _NotEligible("the model is not bf16 on CPU")
        if not cpu.available():
            raise _NotEligible("loom's CPU kernels are not available")
        layers = [layer.stack_layer() for layer in model.layers]
        if None in layers:
            raise _NotEligible("a layer or one of its linear methods has no stack form")
        attn = model.layers[0].self_attn
        rotary = attn.rotary_emb
        if any(layer.self_attn.rotary_emb is not rotary for layer in model.layers):
            raise _NotEligible("the layers do not share one rotary table")
        eps = {m.eps for m in model.modules() if isinstance(m, RMSNorm)}
        if len(eps) != 1:
            raise _NotEligible("the norms differ in eps")
        shape = StackShape(
            hidden=model.norm.weight.shape[0],
            num_heads=attn.num_heads,
            num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            rotary_dim=rotary.rotary_dim,
            interleaved=rotary.interleaved,
            intermediate=model.layers[0].mlp.down_proj.in_features,
            eps=eps.pop(),
            scale=attn.attn.scale,
        )
        try:
            stack = DecoderStack(layers, model.norm.weight.data, shape)
        except ValueError as e:
            raise _NotEligible(str(e)) from e
        return stack, rotary

    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor, caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor | None:
        """The final hidden states of x [T, hidden], or None where this batch takes the modules."""
        t = x.shape[0]
        if self.stack is None or x.dtype != torch.bfloat16 or t > cpu.MAX_ROWS:
            return None
        rows = _token_rows(meta, t)
        if rows is None:
            return None
        if caches is not self._caches:
            self.stack.set_caches([c.tensor for c in caches])
            self._caches = caches
        cos, sin = self.rotary.cos_sin(positions, x.dtype)  # [T, 1, rotary_dim / 2]
        table, lens = rows
        return self.stack.run(x.contiguous(), cos.squeeze(1), sin.squeeze(1), meta.slot_mapping, table, lens)


class _NotEligible(Exception):
    pass


def _token_rows(meta: AttentionMetadata, t: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Block table [T, max_blocks] and key counts [T] of every token of the batch, in batch order: a
    decode token's from its group; token i of a prefill chunk (a draft verification, a short prompt) its
    sequence's table and num_context + i + 1 keys, so that each row attends causally as a decode token
    would. None unless the rows cover the batch."""
    groups, chunks = meta.decodes or [], meta.prefills or []
    if sum(len(g.seq_lens) for g in groups) + sum(c.num_new for c in chunks) != t:
        return None
    if len(groups) == 1 and not chunks and t == 1:
        return groups[0].block_table, groups[0].seq_lens
    width = max([g.block_table.shape[1] for g in groups] + [len(c.block_ids) for c in chunks])
    table = torch.zeros(t, width, dtype=torch.long)
    lens = torch.empty(t, dtype=torch.long)
    for g in groups:
        table[g.token_idx, : g.block_table.shape[1]] = g.block_table
        lens[g.token_idx] = g.seq_lens
    for c in chunks:
        if c.block_ids.device.type != "cpu":
            return None
        end = c.start + c.num_new
        table[c.start : end, : len(c.block_ids)] = c.block_ids
        lens[c.start : end] = torch.arange(c.num_context + 1, c.num_context + c.num_new + 1)
    return table, lens
