"""The runner's image side: the encoder cache, image embeddings scattered into a step's batch, and M-RoPE
positions.

The vision tower runs once per image (per preprocessed size): its output is kept, LRU by bytes and keyed
by the image's content, until every placeholder token of that image has been computed, so chunked prefill
may split an image across steps; after that it stays while it fits, so a preempted request, or the next
turn of a conversation that resends the same screenshot, does not encode it again.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loom.engine.runner_state import CachedRequestState
from loom.multimodal.inputs import ImageInput

logger = logging.getLogger(__name__)


@dataclass
class EncoderStats:
    queries: int = 0
    """Images a step needed."""
    hits: int = 0
    """... found already encoded."""
    images_encoded: int = 0
    encode_seconds: float = 0.0


class EncoderCache:
    """Vision-encoder outputs by image key: LRU by bytes, never evicting an entry a request still needs."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.refs: dict[str, int] = {}
        self.num_bytes = 0

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if key in self.entries:
            return
        self.entries[key] = value
        self.num_bytes += value.numel() * value.element_size()
        self._evict()

    def acquire(self, key: str) -> None:
        self.refs[key] = self.refs.get(key, 0) + 1

    def release(self, key: str) -> None:
        left = self.refs.get(key, 0) - 1
        if left > 0:
            self.refs[key] = left
        else:
            self.refs.pop(key, None)
            self._evict()

    def _evict(self) -> None:
        # Over budget, drop the least recently used entries no request holds; held ones may overshoot it
        # (a step cannot run without them).
        if self.num_bytes <= self.max_bytes:
            return
        for key in [k for k in self.entries if k not in self.refs]:
            value = self.entries.pop(key)
            self.num_bytes -= value.numel() * value.element_size()
            if self.num_bytes <= self.max_bytes:
                return


class MultimodalBatch:
    """Builds a step's image embeddings and M-RoPE positions for the runner of an image-capable model."""

    def __init__(self, model: torch.nn.Module, max_cache_bytes: int):
        self.model = model
        self.uses_mrope = bool(getattr(model, "uses_mrope", False))
        self.cache = EncoderCache(max_cache_bytes)
        self.stats = EncoderStats()
        self._held: dict[str, list[str]] = {}  # request -> keys it holds in the cache

    # ---- which requests hold which images ---------------------------------------------------------

    def admit(self, state: CachedRequestState) -> None:
        keys = [im.cache_key for im in state.images if im.end > state.num_computed_tokens]
        for key in keys:
            self.cache.acquire(key)
        if keys:
            self._held[state.req_id] = keys

    def progress(self, state: CachedRequestState) -> None:
        """Let go of the images whose placeholders are all computed now."""
        keys = self._held.get(state.req_id)
        if not keys:
            return
        done = {im.cache_key for im in state.images if im.end <= state.num_computed_tokens}
        for key in [k for k in keys if k in done]:
            keys.remove(key)
            self.cache.release(key)
        if not keys:
            del self._held[state.req_id]

    def forget(self, req_id: str) -> None:
        for key in self._held.pop(req_id, ()):
            self.cache.release(key)

    # ---- one step -------------------------------------------------------------------------------

    def positions(
        self, flat: list[int], mrope: list[tuple[int, int, int, CachedRequestState]], device: torch.device
    ) -> torch.Tensor:
        """[3, num_tokens] positions: `flat` (each token's index in its sequence) on all three axes, with
        the columns of requests that have images (batch start, ctx, end, state) replaced by theirs."""
        positions = torch.tensor(flat, dtype=torch.long).expand(3, -1).clone()
        for start, ctx, end, state in mrope:
            prompt_len = state.mrope_positions.shape[1]
            cut = min(end, prompt_len)
            if ctx < cut:
                positions[:, start : start + cut - ctx] = state.mrope_positions[:, ctx:cut]
            if end > prompt_len:
                first = max(ctx, prompt_len)
                positions[:, start + first - ctx : start + end - ctx] += state.mrope_delta
        return positions.to(device)

    def embeddings(
        self, input_ids: torch.Tensor, spans: list[tuple[int, int, int, ImageInput]]
    ) -> torch.Tensor:
        """Token embeddings of the batch with the rows of image placeholders replaced by the images'
        encoder outputs. spans: (batch start of the request's chunk, ctx, end, image overlapping it)."""
        wanted = {im.cache_key: im for _, _, _, im in spans}
        self.stats.queries += len(wanted)
        missing = [im for key, im in wanted.items() if self.cache.get(key) is None]
        self.stats.hits += len(wanted) - len(missing)
        if missing:
            self._encode(missing)
        embeds = self.model.embed_input_ids(input_ids)
        for start, ctx, end, im in spans:
            first, last = max(ctx, im.offset), min(end, im.end)
            value = self.cache.get(im.cache_key)
            embeds[start + first - ctx : start + last - ctx] = value[first - im.offset : last - im.offset].to(
                embeds.dtype
            )
        return embeds

    def _encode(self, images: list[ImageInput]) -> None:
        t0 = time.perf_counter()
        device = next(self.model.parameters()).device
        pixels = torch.cat([im.pixel_values for im in images]).to(device)
        outputs = self.model.embed_images(pixels, [im.grid_thw for im in images])
        for im, out in zip(images, outputs, strict=True):
            if out.shape[0] != im.length:
                raise ValueError(
                    f"image {im.content_hash[:12]} encodes to {out.shape[0]} embeddings for {im.length} placeholders"
                )
            self.cache.put(im.cache_key, out)
        self.stats.images_encoded += len(images)
        self.stats.encode_seconds += time.perf_counter() - t0
