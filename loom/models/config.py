"""ModelConfig: what the model code needs from a checkpoint's config.json, read the same way whichever
transformers version wrote it (rope fields at the top level, or nested under `rope_parameters`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loom.errors import ModelLoadError


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    partial_rotary_factor: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: str | None
    eos_token_ids: tuple[int, ...]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_params(self) -> int:
        """Parameters of the dense weights (embedding and lm_head counted separately unless tied)."""
        h, i = self.hidden_size, self.intermediate_size
        qkv = h * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        per_layer = qkv + self.num_heads * self.head_dim * h + 3 * h * i
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ModelLoadError(f"{file} not found: a model directory needs an HF config.json")
        return cls.from_dict(json.loads(file.read_text()), str(file))

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        try:
            arch = d["architectures"][0]
            num_heads = d["num_attention_heads"]
            rope = dict(d.get("rope_parameters") or {})
            scaling = d.get("rope_scaling") or (
                rope if rope.get("rope_type", "default") != "default" else None
            )
            partial = d.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
            if partial is None:
                # GLM's config class defaults to half-rotary when the file does not say.
                partial = 0.5 if d.get("model_type") in ("glm", "glm4") else 1.0
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            return cls(
                architecture=arch,
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_layers=d["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=d.get("num_key_value_heads") or num_heads,
                head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_theta=d.get("rope_theta", rope.get("rope_theta", 10000.0)),
                rope_scaling=scaling,
                partial_rotary_factor=partial,
                max_position_embeddings=d.get("max_position_embeddings", 4096),
                tie_word_embeddings=d.get("tie_word_embeddings", False),
                attention_bias=d.get("attention_bias", False),
                torch_dtype=d.get("torch_dtype") or d.get("dtype"),
                eos_token_ids=eos_ids,
            )
        except (KeyError, IndexError, TypeError) as e:
            raise ModelLoadError(f"{source}: missing or malformed field {e}") from e
