"""GLM (glm-4-9b-chat-hf, `GlmForCausalLM`) and GLM-4-0414 (`Glm4ForCausalLM`).

Both are Llama with interleaved (GPT-J style) partial rotary and q/k/v bias; the checkpoint ships
`gate_up_proj` already packed. GLM-4-0414 adds a norm after attention and after the MLP, each applied
to the branch before it joins the residual.
"""

from __future__ import annotations

import torch

from loom.kernels.decoder import StackLayer
from loom.layers.attention import AttentionMetadata, KVCache
from loom.layers.norm import RMSNorm
from loom.models.config import ModelConfig
from loom.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class GlmAttention(LlamaAttention):
    interleaved_rope = True


class GlmDecoderLayer(LlamaDecoderLayer):
    attention_cls = GlmAttention


class GlmForCausalLM(LlamaForCausalLM):
    layer_cls = GlmDecoderLayer


class Glm4DecoderLayer(GlmDecoderLayer):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

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
        x = self.post_self_attn_layernorm(self.self_attn(positions, x, cache, meta))
        x, residual = self.post_attention_layernorm(x, residual)
        return self.post_mlp_layernorm(self.mlp(x)), residual

    def stack_layer(self) -> StackLayer | None:
        if type(self).forward is not Glm4DecoderLayer.forward:
            return None
        return self._stack_layer(
            post_self_attn_norm=self.post_self_attn_layernorm, post_mlp_norm=self.post_mlp_layernorm
        )


class Glm4ForCausalLM(GlmForCausalLM):
    layer_cls = Glm4DecoderLayer
