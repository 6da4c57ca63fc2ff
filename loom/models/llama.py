"""Llama, and the decoder every other architecture here is a small variation of.

Module names follow the HF checkpoint (`self_attn.qkv_proj`, `mlp.gate_up_proj`, ...) so the loader is a
name mapping; `packed_modules` says which checkpoint tensors are packed into which of our matrices.
"""

from __future__ import annotations

import torch
from torch import nn

from loom.kernels.decoder import StackLayer
from loom.layers.activation import SiluAndMul
from loom.layers.attention import Attention, AttentionMetadata, KVCache
from loom.layers.linear import Linear, MergedLinear
from loom.layers.norm import RMSNorm
from loom.layers.rotary import RotaryEmbedding
from loom.models.config import ModelConfig
from loom.models.cpu_decode import NativeDecode, stack_layer


class LlamaAttention(nn.Module):
    interleaved_rope = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            cfg.hidden_size,
            [self.q_size, self.kv_size, self.kv_size],
            ["q", "k", "v"],
            bias=cfg.attention_bias,
        )
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.rotary_emb = RotaryEmbedding(
            self.head_dim,
            cfg.rotary_dim,
            cfg.max_position_embeddings,
            cfg.rope_theta,
            interleaved=self.interleaved_rope,
            scaling=cfg.rope_scaling,
        )
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, [0, 1])
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = self.attention_cls(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def stack_layer(self) -> StackLayer | None:
        """This layer as loom's native decoder stack runs it (loom/models/cpu_decode.py), or None where
        the stack would not compute what forward does."""
        if type(self).forward is not LlamaDecoderLayer.forward:
            return None
        return self._stack_layer()

    def _stack_layer(self, **extra_norms: RMSNorm) -> StackLayer | None:
        if (
            type(self.self_attn).forward is not LlamaAttention.forward
            or type(self.mlp).forward is not LlamaMLP.forward
        ):
            return None
        return stack_layer(self, **extra_norms)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_cls: type[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList([layer_cls(cfg) for _ in range(cfg.num_layers)])
        # One rotary table for the whole model: its cos/sin for a step are computed once, not per layer.
        for layer in self.layers[1:]:
            layer.self_attn.rotary_emb = self.layers[0].self_attn.rotary_emb
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.native_decode = True
        """Whether small bf16 batches on CPU run the layers as one native call (`NativeDecode`,
        built on the first forward, after the loader has given the linears their methods); the modules
        below are its twin."""
        self._native: NativeDecode | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        caches: list[KVCache],
        meta: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.native_decode:
            if self._native is None:
                self._native = NativeDecode(self)
            out = self._native(x, positions, caches, meta)
            if out is not None:
                return out
        residual = None
        for layer, cache in zip(self.layers, caches, strict=True):
            x, residual = layer(positions, x, residual, cache, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    layer_cls: type[nn.Module] = LlamaDecoderLayer
    # checkpoint module name -> (our packed module, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, self.layer_cls)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of every token in the flattened batch."""
        return self.model(input_ids, positions, caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
