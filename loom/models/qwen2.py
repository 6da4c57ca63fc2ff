"""Qwen2: Llama with a bias on the q/k/v projections (always, whatever config.json says)."""

from __future__ import annotations

import dataclasses

from loom.models.config import ModelConfig
from loom.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(dataclasses.replace(cfg, attention_bias=True))
