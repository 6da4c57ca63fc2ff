"""Greedy generation through a loom model's own forward and paged KV cache, without the engine: prefill
(whole, or in chunks that may split an image), then decode steps, for several sequences in ONE flattened
batch per step, with AttentionMetadata built the way loom/engine/runner.py builds it.

This is the phase-1 stand-in for the engine's multimodal path: each sequence's image embeddings are
computed once (`embed_images`) and scattered into its placeholder rows (`merge_image_embeddings`); each
step then slices the rows and the [3, n] M-RoPE positions of the tokens it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loom.layers.attention import AttentionMetadata, DecodeGroup, KVCache, PrefillSeq
from loom.models.glm4v import mrope_positions

BLOCK_SIZE = 16


@dataclass
class Sequence:
    prompt: list[int]
    pixel_values: torch.Tensor | None = None
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    # filled in by run()
    embeds: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    delta: int = 0
    blocks: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated


class PagedGreedy:
    def __init__(self, model, num_blocks: int = 256):
        cfg = model.config
        self.model = model
        shape = (2, cfg.num_kv_heads, num_blocks, BLOCK_SIZE, cfg.head_dim)
        self.caches = [KVCache(torch.zeros(shape)) for _ in range(cfg.num_layers)]
        self.free = list(range(num_blocks))

    def _prepare(self, seq: Sequence, max_new: int) -> None:
        model, cfg = self.model, self.model.config
        ids = torch.tensor(seq.prompt)
        images = model.embed_images(seq.pixel_values, seq.grids) if seq.grids else []
        seq.embeds = model.merge_image_embeddings(ids, images)
        seq.positions, seq.delta = mrope_positions(
            seq.prompt, seq.grids, cfg.image_token_id, cfg.vision.spatial_merge_size
        )
        need = -(-(len(seq.prompt) + max_new) // BLOCK_SIZE)
        seq.blocks, self.free = self.free[:need], self.free[need:]

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        return [seq.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]

    def _forward(self, input_ids, positions, embeds, slots, meta_kwargs) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots), block_size=BLOCK_SIZE, **meta_kwargs)
        return self.model(
            torch.tensor(input_ids), torch.cat(positions, dim=1), self.caches, meta, torch.cat(embeds)
        )

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], max_new: int, chunk: int | None = None) -> list[Sequence]:
        """Greedy-decode max_new tokens for every sequence. chunk: prefill at most this many tokens of each
        prompt per step (all sequences' chunks in one forward)."""
        for seq in seqs:
            self._prepare(seq, max_new)
        done = [0] * len(seqs)  # prompt tokens computed so far
        while any(d < len(s.prompt) for d, s in zip(done, seqs, strict=True)):
            ids, pos, emb, slots, prefills, last_rows = [], [], [], [], [], []
            for k, seq in enumerate(seqs):
                start = done[k]
                end = len(seq.prompt) if chunk is None else min(len(seq.prompt), start + chunk)
                if start == end:
                    continue
                row = len(ids)
                ids += seq.prompt[start:end]
                pos.append(seq.positions[:, start:end])
                emb.append(seq.embeds[start:end])
                slots += self._slots(seq, start, end)
                blocks = torch.tensor(seq.blocks[: -(-end // BLOCK_SIZE)])
                prefills.append(PrefillSeq(row, end - start, start, blocks))
                if end == len(seq.prompt):
                    last_rows.append((k, row + end - start - 1))
                done[k] = end
            hidden = self._forward(ids, pos, emb, slots, {"prefills": prefills})
            for k, row in last_rows:
                self._sample(seqs[k], hidden[row])
        for _ in range(max_new - 1):
            ids, pos, emb, slots = [], [], [], []
            for seq in seqs:
                i = len(seq.tokens) - 1  # the newest token, not yet in the cache
                ids.append(seq.tokens[i])
                pos.append(torch.full((3, 1), i + seq.delta))
                emb.append(self.model.embed_input_ids(torch.tensor([seq.tokens[i]])))
                slots += self._slots(seq, i, i + 1)
            hidden = self._forward(ids, pos, emb, slots, {"decodes": [self._decode_group(seqs)]})
            for k, seq in enumerate(seqs):
                self._sample(seq, hidden[k])
        return seqs

    def _sample(self, seq: Sequence, hidden: torch.Tensor) -> None:
        logits = self.model.compute_logits(hidden[None])[0].float()
        seq.logits.append(logits)
        seq.generated.append(int(logits.argmax()))

    def _decode_group(self, seqs: list[Sequence]) -> DecodeGroup:
        lens = [len(s.tokens) for s in seqs]
        tables = [s.blocks[: -(-n // BLOCK_SIZE)] for s, n in zip(seqs, lens, strict=True)]
        width = max(len(t) for t in tables)
        key_pos = torch.arange(width * BLOCK_SIZE)
        return DecodeGroup(
            token_idx=torch.arange(len(seqs)),
            block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
            key_mask=(key_pos < torch.tensor(lens).unsqueeze(1))[None, :, None, :],
            seq_lens=torch.tensor(lens),
        )
