"""The model runner: turns a SchedulerOutput into tensors, runs ONE forward over the flattened batch,
computes logits only where a token is sampled (or prompt logprobs were asked), and samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loom.config import EngineConfig
from loom.engine.scheduler import SchedulerOutput
from loom.errors import InvalidRequest
from loom.kv.manager import KVCacheManager
from loom.layers.attention import AttentionMetadata, DecodeGroup, KVCache, PrefillSeq
from loom.layers.sampler import Sampler, SamplingMetadata
from loom.models.config import ModelConfig
from loom.models.loader import load_model
from loom.outputs import TokenLogprobs

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_CACHE_BYTES = 512 * 2**20
# What one more decode group costs, in KV blocks gathered: about 8 small ops per layer (~2 ms a step on a
# 12-layer model on 2 CPU cores) against ~20 us to gather and multiply one block in all layers.
DECODE_GROUP_COST_BLOCKS = 96


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest("device cuda was asked for but CUDA is not available", param="device")
    return device


def resolve_dtype(name: str, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    if name == "auto":
        name = checkpoint_dtype if checkpoint_dtype in DTYPES else "float32"
        if name == "float16" and device.type == "cpu":
            name = "bfloat16"  # same size, and what CPUs have fast kernels for
    if name == "float16" and device.type == "cpu":
        raise InvalidRequest("float16 runs on CUDA only; use bfloat16 or float32 on CPU", param="dtype")
    return DTYPES[name]


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    """request_id -> the token sampled for it this step."""
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """request_id -> logprobs of the prompt tokens this step's chunk predicted (positions 1..)."""


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: Path):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.model_config = ModelConfig.from_dir(model_path)
        self.dtype = resolve_dtype(config.dtype, self.model_config.torch_dtype, self.device)
        self.model = load_model(model_path, self.dtype, self.device)
        self.block_size = config.block_size
        self.num_blocks = self._num_blocks()
        cfg = self.model_config
        shape = (2, cfg.num_kv_heads, self.num_blocks, self.block_size, cfg.head_dim)
        # Zero-filled so the whole pool is resident from the start: memory does not grow while serving.
        self.kv_caches = [
            KVCache(torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(cfg.num_layers)
        ]
        self.sampler = Sampler(config.seed)
        self.decode_group_cost = DECODE_GROUP_COST_BLOCKS
        logger.info(
            "model %s (%s, %s on %s), KV cache %d blocks of %d tokens",
            model_path,
            cfg.architecture,
            self.dtype,
            self.device,
            self.num_blocks,
            self.block_size,
        )

    def _bytes_per_block(self) -> int:
        cfg = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim * elem

    def _num_blocks(self) -> int:
        if self.config.num_blocks is not None:
            return self.config.num_blocks
        budget = self.config.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = (
                    int(free * self.config.gpu_memory_utilization) - 2 * 2**30
                )  # leave room for activations
            else:
                budget = CPU_KV_CACHE_BYTES
        num_blocks = budget // self._bytes_per_block()
        if num_blocks < 1:
            raise InvalidRequest(
                f"KV cache budget of {budget} bytes holds no block", param="kv_cache_memory_bytes"
            )
        return num_blocks

    @torch.inference_mode()
    def execute(
        self, sched: SchedulerOutput, kv: KVCacheManager, sampling: SamplingMetadata | None
    ) -> RunnerOutput:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_idx: list[int] = []
        sample_ids: list[str] = []
        prompt_lp: list[tuple[str, int, list[int], int]] = []  # (request id, first row, next tokens, k)
        decode_idx: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSeq] = []

        for s in sched.scheduled:
            req, n = s.request, s.num_new_tokens
            start, ctx = len(input_ids), req.num_computed_tokens
            end = ctx + n
            table = kv.block_ids(req.request_id)
            input_ids.extend(req.all_token_ids[ctx:end])
            positions.extend(range(ctx, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(ctx, end))
            if n == 1:
                decode_idx.append(start)
                decode_tables.append(table[: -(-end // bs)])
                decode_lens.append(end)
            else:
                prefills.append(
                    PrefillSeq(start, n, ctx, torch.tensor(table[: -(-end // bs)], device=self.device))
                )
            if req.params.prompt_logprobs is not None and ctx < req.num_prompt_tokens - 1:
                last = min(end, req.num_prompt_tokens - 1)
                next_tokens = req.all_token_ids[ctx + 1 : last + 1]
                prompt_lp.append((req.request_id, len(logits_idx), next_tokens, req.params.prompt_logprobs))
                logits_idx.extend(range(start, start + last - ctx))
            if s.samples:
                sample_ids.append(req.request_id)
                logits_idx.append(start + n - 1)

        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev), block_size=bs, prefills=prefills
        )
        if decode_idx:
            meta.decodes = [
                self._decode_group(
                    [decode_idx[i] for i in g], [decode_tables[i] for i in g], [decode_lens[i] for i in g]
                )
                for g in group_by_length([len(t) for t in decode_tables], self.decode_group_cost)
            ]

        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            self.kv_caches,
            meta,
        )
        out = RunnerOutput()
        if not logits_idx:
            return out
        logits = self.model.compute_logits(hidden[torch.tensor(logits_idx, device=dev)]).float()
        if sample_ids:
            result = self.sampler(logits[-len(sample_ids) :], sampling)
            out.sampled = dict(zip(sample_ids, result.token_ids, strict=True))
            if result.logprobs is not None:
                out.logprobs = {
                    rid: lp for rid, lp in zip(sample_ids, result.logprobs, strict=True) if lp is not None
                }
        for rid, row, next_tokens, k in prompt_lp:
            out.prompt_logprobs[rid] = _token_logprobs(logits[row : row + len(next_tokens)], next_tokens, k)
        return out

    def _decode_group(self, token_idx: list[int], tables: list[list[int]], lens: list[int]) -> DecodeGroup:
        dev, width = self.device, max(len(t) for t in tables)
        key_pos = torch.arange(width * self.block_size, device=dev)
        return DecodeGroup(
            token_idx=torch.tensor(token_idx, dtype=torch.long, device=dev),
            block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=dev),
            key_mask=(key_pos < torch.tensor(lens, device=dev).unsqueeze(1))[
                None, :, None, :
            ],  # [1, n, 1, L]
        )


def group_by_length(num_blocks: list[int], group_cost: int) -> list[list[int]]:
    """Split decode sequences (given their block counts) into groups of similar length, longest first.

    A group is padded to its longest sequence; one more group costs about `group_cost` blocks' worth of
    gathering in launch overhead. Walking the sequences longest first, a new group starts where cutting
    saves more than that: every sequence from there on would otherwise be padded by at least the
    difference between the group's longest and this one."""
    order = sorted(range(len(num_blocks)), key=num_blocks.__getitem__, reverse=True)
    groups: list[list[int]] = []
    longest = 0
    for rank, i in enumerate(order):
        if not groups or (longest - num_blocks[i]) * (len(order) - rank) > group_cost:
            groups.append([])
            longest = num_blocks[i]
        groups[-1].append(i)
    return groups


def _token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprobs]:
    """For each row: {the given token: its logprob, then the k most likely tokens}."""
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
    out = [{t: v} for t, v in zip(tokens, chosen, strict=True)]
    if k > 0:
        vals, ids = logprobs.topk(k, dim=-1)
        for entry, row_ids, row_vals in zip(out, ids.tolist(), vals.tolist(), strict=True):
            for tid, val in zip(row_ids, row_vals, strict=True):
                entry.setdefault(tid, val)
    return out
