"""The model runner: turns a SchedulerOutput into tensors, runs ONE forward over the flattened batch,
computes logits only where a token is sampled (or prompt logprobs were asked), and samples.

It knows requests only through the typed values of loom/engine/step.py and its own RequestStates; it never
touches the scheduler's Request objects or the KV manager."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from loom.config import EngineConfig
from loom.engine.multimodal import MultimodalBatch
from loom.engine.runner_state import CachedRequestState, RequestStates
from loom.engine.step import ModelRunnerOutput, SchedulerOutput
from loom.engine.structured.engine import StepBitmask
from loom.errors import InvalidRequest
from loom.layers.attention import AttentionMetadata, DecodeGroup, KVCache, PrefillSeq
from loom.layers.rejection_sampler import verify as verify_drafts
from loom.layers.sampler import Sampler, SamplingMetadata
from loom.models.config import ModelConfig
from loom.models.loader import load_model
from loom.multimodal.inputs import ImageInput
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


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: Path):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.model_config = ModelConfig.from_dir(model_path)
        self.dtype = resolve_dtype(config.dtype, self.model_config.torch_dtype, self.device)
        self.model = load_model(
            model_path, self.dtype, self.device, config.quantization, config.quantization_group_size
        )
        self.block_size = config.block_size
        self.num_blocks = self._num_blocks()
        cfg = self.model_config
        shape = (2, cfg.num_kv_heads, self.num_blocks, self.block_size, cfg.head_dim)
        # Zero-filled so the whole pool is resident from the start: memory does not grow while serving.
        self.kv_caches = [
            KVCache(torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(cfg.num_layers)
        ]
        self.sampler = Sampler(config.seed)
        self.states = RequestStates()
        self.mm = (
            MultimodalBatch(self.model, config.encoder_cache_bytes)
            if getattr(self.model, "supports_images", False)
            else None
        )
        """The image side (encoder cache, embeddings, M-RoPE positions) of a vision-language model."""
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

    def forget(self, req_ids: set[str]) -> None:
        """Drop the state of requests that finished (or were preempted) while no batch ran."""
        self.update_states(SchedulerOutput(finished_req_ids=req_ids))

    def update_states(self, sched: SchedulerOutput) -> None:
        """Take in what the scheduler says changed (requests to forget, new ones, new blocks)."""
        if self.mm is not None:
            for req_id in sched.finished_req_ids:
                self.mm.forget(req_id)
        self.states.update(sched)
        if self.mm is not None:
            for new in sched.new_reqs:
                self.mm.admit(self.states[new.req_id])

    def execute(self, sched: SchedulerOutput, grammar: StepBitmask | None = None) -> ModelRunnerOutput:
        """Take in what the scheduler says changed, then run its batch."""
        self.update_states(sched)
        return self.run(sched.num_scheduled_tokens, sched.spec_token_ids, grammar)

    @torch.inference_mode()
    def run(
        self,
        num_scheduled_tokens: dict[str, int],
        spec_token_ids: dict[str, list[int]] | None = None,
        grammar: StepBitmask | None = None,
    ) -> ModelRunnerOutput:
        """One forward over these requests (held in `states`), sampling where a request reaches its end
        and verifying its draft tokens, if it has any; `grammar` masks the rows of requests under one.

        All or nothing: if it raises, no request's state has moved and every seeded generator is back
        where it was, so the engine can run the same requests again (without the one at fault)."""
        spec_token_ids = spec_token_ids or {}
        states = self.states
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_ids: list[str] = []
        sample_rows: list[int] = []
        verify: list[tuple[str, int, list[int]]] = []  # (request id, first of its verify rows, drafts)
        verify_rows: list[int] = []
        prompt_lp: list[tuple[str, int, list[int], int]] = []  # (request id, first row, next tokens, k)
        prompt_rows: list[int] = []
        decode_idx: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSeq] = []
        mrope: list[tuple[int, int, int, CachedRequestState]] = []  # (batch start, ctx, end, state)
        image_spans: list[tuple[int, int, int, ImageInput]] = []

        for req_id, n in num_scheduled_tokens.items():
            state = states[req_id]
            start, ctx = len(input_ids), state.num_computed_tokens
            end = ctx + n
            table = state.block_ids
            draft = spec_token_ids.get(req_id, [])
            input_ids.extend(state.token_ids[ctx : end - len(draft)])
            input_ids.extend(draft)
            positions.extend(range(ctx, end))
            if state.mrope_positions is not None:
                mrope.append((start, ctx, end, state))
            image_spans += [(start, ctx, end, im) for im in state.images if im.overlaps(ctx, end)]
            slots.extend(table[p // bs] * bs + p % bs for p in range(ctx, end))
            if n == 1:
                decode_idx.append(start)
                decode_tables.append(table[: -(-end // bs)])
                decode_lens.append(end)
            else:
                prefills.append(
                    PrefillSeq(start, n, ctx, torch.tensor(table[: -(-end // bs)], device=self.device))
                )
            if state.params.prompt_logprobs is not None and ctx < state.num_prompt_tokens - 1:
                last = min(end, state.num_prompt_tokens - 1)
                next_tokens = state.token_ids[ctx + 1 : last + 1]
                prompt_lp.append((req_id, len(prompt_rows), next_tokens, state.params.prompt_logprobs))
                prompt_rows.extend(range(start, start + last - ctx))
            if draft:  # the last real token and each draft predict the next: d + 1 rows
                verify.append((req_id, len(verify_rows), draft))
                verify_rows.extend(range(start + n - 1 - len(draft), start + n))
            elif state.samples(n):
                sample_ids.append(req_id)
                sample_rows.append(start + n - 1)

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

        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        if self.mm is not None and self.mm.uses_mrope:
            pos = self.mm.positions(positions, mrope, dev)
        else:
            pos = torch.tensor(positions, dtype=torch.long, device=dev)
        if image_spans:
            hidden = self.model(ids, pos, self.kv_caches, meta, self.mm.embeddings(ids, image_spans))
        else:
            hidden = self.model(ids, pos, self.kv_caches, meta)
        out = ModelRunnerOutput()
        if sample_rows or verify_rows or prompt_rows:
            # Three parts, each addressed by its own offsets: a row per sampling request, d + 1 rows per
            # request verifying d drafts, then prompt-logprob rows.
            rows = torch.tensor(sample_rows + verify_rows + prompt_rows, device=dev)
            logits = self.model.compute_logits(hidden[rows]).float()
            num_sampling = len(sample_rows) + len(verify_rows)
            if grammar is not None:  # before penalties and sampling; prompt-logprob rows stay raw
                grammar.apply(
                    logits,
                    [(rid, i, 1) for i, rid in enumerate(sample_ids)]
                    + [(rid, len(sample_rows) + row, len(d) + 1) for rid, row, d in verify],
                )
            self._sample(
                logits[: len(sample_rows)], sample_ids, logits[len(sample_rows) : num_sampling], verify, out
            )
            prompt_logits = logits[num_sampling:]
            for req_id, row, next_tokens, k in prompt_lp:
                out.prompt_logprobs[req_id] = _token_logprobs(
                    prompt_logits[row : row + len(next_tokens)], next_tokens, k
                )
        sampled = dict(zip(out.req_ids, out.sampled_token_ids, strict=True))
        for req_id, n in num_scheduled_tokens.items():
            states.advance(req_id, n, sampled.get(req_id, []), len(spec_token_ids.get(req_id, ())))
            if self.mm is not None:
                self.mm.progress(states[req_id])
        return out

    def _sample(
        self,
        logits: torch.Tensor,
        sample_ids: list[str],
        verify_logits: torch.Tensor,
        verify: list[tuple[str, int, list[int]]],
        out: ModelRunnerOutput,
    ) -> None:
        """Sample the plain rows (a row per request of sample_ids) in one batch, then verify each
        request's drafts on its own rows of verify_logits."""
        metas = [self._sampling_metadata(sample_ids)] if sample_ids else []
        metas += [self._sampling_metadata([rid] * (len(d) + 1), d) for rid, _, d in verify]
        # A seeded request's stream must not move in a step that fails and is run again.
        saved = [(g, g.get_state()) for meta in metas for g in meta.generators if g is not None]
        try:
            if sample_ids:
                result = self.sampler(logits, metas[0])
                out.req_ids += sample_ids
                out.sampled_token_ids += [[t] for t in result.token_ids]
                lps = result.logprobs or [None] * len(sample_ids)
                out.logprobs += [None if lp is None else [lp] for lp in lps]
            for (req_id, row, draft), meta in zip(verify, metas[1 if sample_ids else 0 :], strict=True):
                result = verify_drafts(self.sampler, verify_logits[row : row + len(draft) + 1], draft, meta)
                out.req_ids.append(req_id)
                out.sampled_token_ids.append(result.token_ids)
                out.logprobs.append(result.logprobs if result.logprobs is not None else None)
        except BaseException:
            for g, state in saved:
                g.set_state(state)
            raise

    def _sampling_metadata(self, req_ids: list[str], draft: list[int] | None = None) -> SamplingMetadata:
        """One row per id; with a draft, req_ids is one request repeated, row j seeing draft[:j] as
        already generated."""
        states = [self.states[rid] for rid in req_ids]
        outputs = [st.output_token_ids for st in states]
        if draft:
            outputs = [outputs[0] + draft[:j] for j in range(len(states))]
        banned = []
        for st, generated in zip(states, outputs, strict=True):
            # Before min_tokens, nothing that would end the sequence may be sampled.
            if len(generated) < st.params.min_tokens:
                banned.append(list(st.params.stop_token_ids) + sorted(st.eos_token_ids))
            else:
                banned.append([])
        return SamplingMetadata(
            params=[st.params for st in states],
            output_token_ids=outputs,
            prompt_token_ids=[st.prompt_token_ids for st in states],
            generators=[st.generator for st in states],
            banned_token_ids=banned,
        )

    def _decode_group(self, token_idx: list[int], tables: list[list[int]], lens: list[int]) -> DecodeGroup:
        dev, width = self.device, max(len(t) for t in tables)
        key_pos = torch.arange(width * self.block_size, device=dev)
        seq_lens = torch.tensor(lens, dtype=torch.long)
        return DecodeGroup(
            token_idx=torch.tensor(token_idx, dtype=torch.long, device=dev),
            block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=dev),
            key_mask=(key_pos < seq_lens.to(dev).unsqueeze(1))[None, :, None, :],  # [1, n, 1, L]
            seq_lens=seq_lens,
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
