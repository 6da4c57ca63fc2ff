"""ModelConfig: what the model code needs from a checkpoint's config.json, read the same way whichever
transformers version wrote it (rope fields at the top level, or nested under `rope_parameters`).

Vision-language checkpoints (GLM-4.1V) nest the decoder's fields under `text_config` and the vision
tower's under `vision_config`: ModelConfig reads the decoder from the former (so everything that sizes the
KV cache reads the same fields whatever the model) and keeps the latter as a VisionConfig."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from loom.errors import ModelLoadError
from loom.layers.quant.checkpoint import CheckpointQuantization


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower of a GLM-4.1V checkpoint (`vision_config`); defaults are transformers'."""

    depth: int = 24
    hidden_size: int = 1536
    intermediate_size: int = 13696
    """Width of the patch merger's MLP (the vision blocks' MLPs are out_hidden_size wide)."""
    num_heads: int = 12
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    image_size: int = 336
    """Side of the square the learned position embeddings were trained for (24 x 24 patches)."""
    in_channels: int = 3
    out_hidden_size: int = 4096
    """The text model's hidden size: what one image token is."""
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    """Base of the 2D rotary over patch rows and columns."""

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        d = {**(d.get("rope_parameters") or {}), **d}
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})


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
    mrope_section: tuple[int, ...] | None = None
    """Rotary frequency bands turned by the temporal, height and width positions (M-RoPE models only)."""
    vision: VisionConfig | None = None
    image_token_id: int | None = None
    """The placeholder token an image's embeddings replace (one per image token)."""
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    quantization: CheckpointQuantization | None = None
    """A GPTQ or AWQ int4 checkpoint's format (its `quantization_config`); None for a float checkpoint."""

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
            top, vision = d, d.get("vision_config")
            if isinstance(d.get("text_config"), dict):
                # The decoder's fields; the top level may still say dtype, tying or eos (older writers).
                d = {**{k: v for k, v in top.items() if k != "text_config"}, **d["text_config"]}
            # transformers' GLM-4.1V decoder always has q/k/v biases and head_dim = hidden / heads, and
            # falls back to these M-RoPE bands, whatever the file says.
            glm4v = top.get("model_type") == "glm4v"
            num_heads = d["num_attention_heads"]
            rope = dict(d.get("rope_parameters") or {})
            scaling = d.get("rope_scaling") or (
                rope if rope.get("rope_type", "default") != "default" else None
            )
            if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
                scaling = None
            partial = d.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
            if partial is None:
                # GLM's config class defaults to half-rotary when the file does not say.
                partial = 0.5 if d.get("model_type") in ("glm", "glm4") else 1.0
            mrope = (d.get("rope_scaling") or {}).get("mrope_section") or rope.get("mrope_section")
            mrope = mrope or ([8, 12, 12] if glm4v else None)
            if (
                mrope
                and scaling is not None
                and scaling.get("rope_type", scaling.get("type")) in (None, "mrope")
            ):
                scaling = (
                    None  # transformers 4.x wrote M-RoPE as a rope "type"; its frequencies are the default
                )
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
                head_dim=(None if glm4v else d.get("head_dim")) or d["hidden_size"] // num_heads,
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_theta=d.get("rope_theta", rope.get("rope_theta", 10000.0)),
                rope_scaling=scaling,
                partial_rotary_factor=partial,
                max_position_embeddings=d.get("max_position_embeddings", 4096),
                tie_word_embeddings=d.get("tie_word_embeddings", False),
                attention_bias=glm4v or d.get("attention_bias", False),
                torch_dtype=d.get("torch_dtype") or d.get("dtype"),
                eos_token_ids=eos_ids,
                mrope_section=tuple(mrope) if mrope else None,
                vision=VisionConfig.from_dict(vision) if isinstance(vision, dict) else None,
                image_token_id=top.get("image_token_id"),
                image_start_token_id=top.get("image_start_token_id"),
                image_end_token_id=top.get("image_end_token_id"),
                quantization=CheckpointQuantization.from_config(top.get("quantization_config"), source),
            )
        except (KeyError, IndexError, TypeError) as e:
            raise ModelLoadError(f"{source}: missing or malformed field {e}") from e
