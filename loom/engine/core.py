"""EngineCore: the step loop. Each step: schedule, one forward for the whole batch, sample, append,
check stops, detokenize, free what finished, and report what changed."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loom.config import EngineConfig
from loom.engine.request import FINISH_REASONS, Request, RequestStatus
from loom.engine.runner import ModelRunner
from loom.engine.scheduler import Scheduler, SchedulerOutput
from loom.errors import ContextLengthExceeded, InvalidRequest
from loom.kv.manager import KVCacheManager
from loom.layers.sampler import SamplingMetadata
from loom.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from loom.sampling_params import SamplingParams
from loom.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class RequestGroup:
    """A request as the caller sees it: one prompt, `n` sequences, and their detokenizers."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=lambda: [None])
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class EngineStats:
    """Counters since start, for metrics and tests."""

    num_steps: int = 0
    num_forward_tokens: int = 0
    num_prompt_tokens_computed: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0


def resolve_model_path(config: EngineConfig) -> Path:
    if config.model is not None:
        path = Path(config.model)
        if not path.is_dir():
            raise InvalidRequest(
                f"model directory {path} does not exist (models are never downloaded)", param="model"
            )
        return path
    from loom.models.tiny import default_model_dir

    return default_model_dir()


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_path = resolve_model_path(config)
        self.tokenizer = Tokenizer(config.tokenizer or self.model_path)
        self.runner = ModelRunner(config, self.model_path)
        mcfg = self.runner.model_config
        self.vocab_size = mcfg.vocab_size
        self.eos_token_ids = set(mcfg.eos_token_ids) | self.tokenizer.eos_token_ids
        max_len = config.max_model_len or mcfg.max_position_embeddings
        pool_tokens = self.runner.num_blocks * config.block_size
        if max_len > pool_tokens:
            logger.warning(
                "max_model_len %d exceeds the KV pool (%d tokens); capping it", max_len, pool_tokens
            )
            max_len = pool_tokens
        if not config.enable_chunked_prefill and max_len > config.max_num_batched_tokens:
            # Without chunking a sequence must fit one step's budget whole (a preempted one is recomputed).
            logger.warning(
                "chunked prefill is off: capping max_model_len %d to max_num_batched_tokens %d",
                max_len,
                config.max_num_batched_tokens,
            )
            max_len = config.max_num_batched_tokens
        self.max_model_len = max_len
        self.kv = KVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv, self.max_model_len)
        self.groups: dict[str, RequestGroup] = {}
        self.stats = EngineStats()

    # ---- requests in and out -------------------------------------------------------------------

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Checks a tokenized prompt against the model; returns the effective max_tokens."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty", param="prompt")
        bad = next(
            (t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None
        )
        if bad is not None:
            raise InvalidRequest(
                f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})", param="prompt"
            )
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise InvalidRequest(f"logprobs may be at most {self.config.max_logprobs}", param="logprobs")
        if params.max_tokens is None:
            if n >= self.max_model_len:
                raise ContextLengthExceeded(
                    f"the prompt has {n} tokens; this model's context is {self.max_model_len}", param="prompt"
                )
            return self.max_model_len - n
        if n + params.max_tokens > self.max_model_len:
            raise ContextLengthExceeded(
                f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds this model's context of "
                f"{self.max_model_len} tokens",
                param="max_tokens",
            )
        return params.max_tokens

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.groups:
            raise InvalidRequest(f"request id {request_id!r} is already in use", param="request_id")
        if isinstance(prompt, str):
            prompt_text, prompt_ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, prompt_ids = None, list(prompt)
        max_tokens = self.validate_prompt(prompt_ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs, detoks = [], []
        for k in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.runner.device)
                # Each of the n sequences gets its own stream, reproducible from the one seed.
                generator.manual_seed(params.seed if k == 0 else hash((params.seed, k)) & (2**63 - 1))
            seq_id = request_id if params.n == 1 else f"{request_id}#{k}"
            seqs.append(Request(seq_id, prompt_ids, params, max_tokens, request_id, k, arrival, generator))
            detoks.append(
                IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_ids,
                    params.skip_special_tokens,
                    params.stop,
                    params.include_stop_str_in_output,
                )
            )
        self.groups[request_id] = RequestGroup(request_id, prompt_text, prompt_ids, params, seqs, detoks)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. Returns whether it was still known."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return False
        for seq in group.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, RequestStatus.FINISHED_ABORTED)
        return True

    def release_program(self, program_id: str) -> bool:
        """An agent program ended: unpin the KV kept for its next call, and forget its service."""
        self.scheduler.program_service.pop(program_id, None)
        return self.kv.release(program_id)

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix no running request holds (for benchmarks that repeat prompts).
        Returns how many blocks were dropped."""
        return self.kv.reset_prefix_cache()

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns the outputs (deltas) of requests that changed."""
        if self.kv.pins:
            self.kv.expire_pins()
        sched = self.scheduler.schedule()
        self.stats.num_preemptions += len(sched.preempted)
        if not sched:
            return []
        sampling = self._sampling_metadata(sched)
        result = self.runner.execute(sched, self.kv, sampling)
        self.stats.num_steps += 1
        self.stats.num_forward_tokens += sched.num_tokens

        now = time.monotonic()
        deltas: dict[str, dict[int, CompletionOutput]] = {}
        for s in sched.scheduled:
            req = s.request
            if req.num_computed_tokens < req.num_prompt_tokens:
                self.stats.num_prompt_tokens_computed += min(
                    s.num_new_tokens, req.num_prompt_tokens - req.num_computed_tokens
                )
            group = self.groups[req.parent_id]
            chunk_lp = result.prompt_logprobs.get(req.request_id)
            # The n sequences share one prompt, and a preempted one recomputes it: keep each position once.
            if (
                chunk_lp is not None
                and req.index == 0
                and len(group.prompt_logprobs) == req.num_computed_tokens + 1
            ):
                group.prompt_logprobs.extend(chunk_lp)
            req.num_computed_tokens += s.num_new_tokens
            token = result.sampled.get(req.request_id)
            if token is None:
                continue
            delta = self._append(req, token, result.logprobs.get(req.request_id), group, now)
            deltas.setdefault(req.parent_id, {})[req.index] = delta
        return self._outputs(deltas)

    def _sampling_metadata(self, sched: SchedulerOutput) -> SamplingMetadata | None:
        reqs = [s.request for s in sched.scheduled if s.samples]
        if not reqs:
            return None
        banned = []
        for r in reqs:
            if r.num_output_tokens < r.params.min_tokens:
                stops = list(r.params.stop_token_ids) + (
                    [] if r.params.ignore_eos else sorted(self.eos_token_ids)
                )
                banned.append(stops)
            else:
                banned.append([])
        return SamplingMetadata(
            params=[r.params for r in reqs],
            output_token_ids=[r.output_token_ids for r in reqs],
            prompt_token_ids=[r.prompt_token_ids for r in reqs],
            generators=[r.generator for r in reqs],
            banned_token_ids=banned,
        )

    def _append(
        self, req: Request, token: int, logprobs: TokenLogprobs | None, group: RequestGroup, now: float
    ) -> CompletionOutput:
        detok = group.detokenizers[req.index]
        if req.max_tokens == 0:  # prompt logprobs only (echo): nothing is generated
            self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)
            delta = CompletionOutput(index=req.index)
            delta.finish_reason = "length"
            return delta
        delta = CompletionOutput(index=req.index, logprobs=[logprobs] if logprobs is not None else None)
        if req.first_token_time is None:
            req.first_token_time = now
        req.append_token(token)
        self.stats.num_generated_tokens += 1
        delta.token_ids = [token]
        status = None
        params = req.params
        if token in params.stop_token_ids:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token
        elif not params.ignore_eos and token in self.eos_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        text, matched = detok.step([token])
        if matched is not None and status is None:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, matched
        if status is None and (
            req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len
        ):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            if matched is None:
                text += detok.flush()
            if req.program_id is not None and self.config.program_pin_ttl_s > 0:
                self.kv.pin(req.program_id, req, self.config.program_pin_ttl_s)
            self.scheduler.finish(req, status)
            delta.finish_reason = FINISH_REASONS[status]
            delta.stop_reason = req.stop_reason
        delta.text = text
        return delta

    def _outputs(self, deltas: dict[str, dict[int, CompletionOutput]]) -> list[RequestOutput]:
        outputs = []
        for request_id, by_index in deltas.items():
            group = self.groups[request_id]
            finished = group.finished
            out = RequestOutput(
                request_id=request_id,
                prompt=group.prompt,
                prompt_token_ids=group.prompt_token_ids,
                outputs=[by_index[k] for k in sorted(by_index)],
                finished=finished,
                num_cached_tokens=max(0, min(s.num_cached_tokens for s in group.seqs)),
            )
            if group.params.prompt_logprobs is not None and not group.prompt_logprobs_sent:
                out.prompt_logprobs = group.prompt_logprobs
                group.prompt_logprobs_sent = True
            seq0 = group.seqs[0]
            out.metrics = {
                "arrival_time": seq0.arrival_time,
                "first_scheduled_time": seq0.first_scheduled_time,
                "first_token_time": seq0.first_token_time,
                "num_preemptions": sum(s.num_preemptions for s in group.seqs),
            }
            if finished:
                out.metrics["finished_time"] = time.monotonic()
                del self.groups[request_id]
            outputs.append(out)
        return outputs
