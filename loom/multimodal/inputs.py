"""What the engine receives for each image of a prompt: its pixels, its place in the prompt, and the hash
that keys the encoder cache and enters the prefix-cache hashes of the blocks it covers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class ImageInput:
    content_hash: str
    """sha256 of the decoded pixels (loom.multimodal.media.LoadedImage.content_hash)."""
    pixel_values: torch.Tensor = field(repr=False)
    """[num_patches, channels * temporal_patch * patch * patch], as the vision tower takes it."""
    grid_thw: tuple[int, int, int]
    offset: int
    """Index in the prompt of the first of its placeholder tokens."""
    length: int
    """Its placeholder tokens (one per image embedding row)."""

    @property
    def end(self) -> int:
        return self.offset + self.length

    def overlaps(self, start: int, end: int) -> bool:
        return self.offset < end and start < self.end

    @property
    def cache_key(self) -> str:
        """Encoder-cache key: the same picture preprocessed to the same grid has the same embeddings."""
        t, h, w = self.grid_thw
        return f"{self.content_hash}:{t}x{h}x{w}"
