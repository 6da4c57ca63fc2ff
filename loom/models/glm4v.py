"""GLM-4.1V (`Glm4vForConditionalGeneration`; AutoGLM-Phone-9B has the same architecture): the GLM-4
decoder with multimodal rotary positions (M-RoPE), and a vision tower (glm4v_vision.py) whose outputs
replace the embeddings of the image placeholder tokens.

The interface the engine drives:
- `embed_images(pixel_values, image_grid_thw)`: one [num_image_tokens, hidden] tensor per image (run
  once per image; the engine caches it by the image's content hash);
- `embed_input_ids(input_ids)`, then `forward(input_ids, positions, caches, meta, inputs_embeds)` where
  `inputs_embeds` carries the image embeddings scattered into the rows of the placeholder tokens
  (`merge_image_embeddings` does that for whole prompts) and `positions` is [3, num_tokens];
- `mrope_positions(...)`: a prompt's [3, n] positions and the delta its later tokens add to their index.

A prompt renders each image as `<|begin_of_image|>` + num_image_tokens x `<|image|>` + `<|end_of_image|>`
(the processor expands the template's single `<|image|>`; see loom.multimodal.processor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from loom.errors import ModelLoadError
from loom.layers.attention import AttentionMetadata, KVCache
from loom.layers.linear import Linear
from loom.layers.rotary import RotaryEmbedding
from loom.models.config import ModelConfig
from loom.models.glm import Glm4DecoderLayer, GlmAttention
from loom.models.glm4v_vision import Glm4vVisionModel
from loom.models.llama import LlamaForCausalLM, LlamaModel
from loom.multimodal.processor import placeholder_ranges


class Glm4vTextAttention(GlmAttention):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        # GLM's interleaved partial rotary, with its frequency bands split over (t, h, w) positions.
        self.rotary_emb = RotaryEmbedding(
            self.head_dim,
            cfg.rotary_dim,
            cfg.max_position_embeddings,
            cfg.rope_theta,
            interleaved=True,
            scaling=cfg.rope_scaling,
            mrope_section=cfg.mrope_section,
        )


class Glm4vTextDecoderLayer(Glm4DecoderLayer):
    attention_cls = Glm4vTextAttention


class Glm4vModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vision is None or cfg.image_token_id is None or cfg.mrope_section is None:
            raise ModelLoadError("a GLM-4.1V config needs vision_config, image_token_id and an mrope_section")
        self.visual = Glm4vVisionModel(cfg.vision)
        self.language_model = LlamaModel(cfg, Glm4vTextDecoderLayer)


class Glm4vForConditionalGeneration(nn.Module):
    supports_images = True
    uses_mrope = True
    packed_modules = LlamaForCausalLM.packed_modules
    # Checkpoints written before transformers nested the decoder under `language_model` (and anything
    # converted from them) name it `model.*` and the vision tower `visual.*`; first matching prefix wins.
    checkpoint_prefixes = (
        ("model.language_model.", "model.language_model."),
        ("model.visual.", "model.visual."),
        ("model.", "model.language_model."),
        ("visual.", "model.visual."),
    )

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Glm4vModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def num_image_tokens(self, grid_thw: Sequence[int]) -> int:
        """Placeholder tokens an image of patch grid (t, h, w) takes: one per merge x merge window."""
        return image_token_count(grid_thw, self.config.vision.spatial_merge_size)

    def embed_images(self, pixel_values: torch.Tensor, image_grid_thw) -> list[torch.Tensor]:
        """The vision tower and merger: one [num_image_tokens_i, hidden] tensor per image."""
        grids = [tuple(int(v) for v in g) for g in image_grid_thw]
        return self.model.visual(pixel_values, grids)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.embed_tokens(input_ids)

    def merge_image_embeddings(
        self, input_ids: torch.Tensor, image_embeds: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Token embeddings of `input_ids` with the image placeholder rows replaced, in order, by the rows of
        `image_embeds` (all of them, concatenated: the prompt must hold exactly that many placeholders)."""
        embeds = self.embed_input_ids(input_ids)
        rows = (input_ids == self.image_token_id).nonzero().squeeze(1)
        image_rows = torch.cat(list(image_embeds)) if image_embeds else embeds[:0]
        if rows.numel() != image_rows.shape[0]:
            raise ValueError(
                f"{rows.numel()} image placeholder tokens but {image_rows.shape[0]} image embeddings"
            )
        embeds[rows] = image_rows.to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        caches: list[KVCache],
        meta: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden]. positions: [3, num_tokens] (or [num_tokens] for text-only
        tokens, which is the same thing: text has equal t, h and w positions)."""
        return self.model.language_model(input_ids, positions, caches, meta, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def image_token_count(grid_thw: Sequence[int], merge_size: int) -> int:
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size * merge_size)


def mrope_positions(
    token_ids: Sequence[int],
    image_grids: Sequence[Sequence[int]],
    image_token_id: int,
    merge_size: int,
) -> tuple[torch.Tensor, int]:
    """A prompt's M-RoPE positions ([3, len(token_ids)]: temporal, height, width) and its delta.

    Text tokens count up on all three axes. An image's placeholder tokens (a run of `image_token_id`,
    one run per grid in `image_grids`, in order) all start from the next free position and add their
    frame, row and column in the merged grid, so an image of h x w tokens advances the positions by
    max(t, h, w) instead of t * h * w. Generated token i (i >= len(token_ids)) takes position i + delta on
    every axis; delta is <= 0 (= max position + 1 - len(token_ids)).
    """
    n = len(token_ids)
    runs = placeholder_ranges(token_ids, image_token_id)
    if len(runs) != len(image_grids):
        raise ValueError(f"{len(image_grids)} image grids but {len(runs)} runs of image tokens in the prompt")
    out = torch.empty(3, n, dtype=torch.long)
    next_pos = done = 0  # next free position; tokens laid out so far
    for k, ((start, length), grid) in enumerate(zip(runs, image_grids, strict=True)):
        out[:, done:start] = torch.arange(next_pos, next_pos + start - done)  # the text before the image
        next_pos += start - done
        t, h, w = (int(v) for v in grid)
        gt, gh, gw = t, h // merge_size, w // merge_size
        if length != gt * gh * gw:
            raise ValueError(f"image {k} has {length} placeholder tokens, its grid needs {gt * gh * gw}")
        end = start + length
        out[0, start:end] = torch.arange(gt).repeat_interleave(gh * gw) + next_pos
        out[1, start:end] = torch.arange(gh).repeat_interleave(gw).repeat(gt) + next_pos
        out[2, start:end] = torch.arange(gw).repeat(gt * gh) + next_pos
        next_pos += max(gt, gh, gw)
        done = end
    out[:, done:] = torch.arange(next_pos, next_pos + n - done)
    return out, next_pos - done
