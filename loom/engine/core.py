"""EngineCore: the step loop. Each step: schedule, one forward for the whole batch, sample, and let the
scheduler apply the result (append, stop checks, frees). Token ids in, token ids out: text is the
frontend's business (loom/frontend)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from loom.config import EngineConfig
from loom.engine.io import EngineCoreOutput, EngineRequest
from loom.engine.request import Request, RequestStatus
from loom.engine.runner import ModelRunner
from loom.engine.scheduler import Scheduler, SchedulerStats
from loom.engine.step import SchedulerOutput
from loom.engine.structured.engine import StepBitmask, StructuredOutputManager
from loom.errors import InvalidRequest
from loom.kv.manager import KVCacheManager

logger = logging.getLogger(__name__)


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
        self.runner = ModelRunner(config, self.model_path)
        self.model_config = mcfg = self.runner.model_config
        self.vocab_size = mcfg.vocab_size
        max_len = config.max_model_len or mcfg.max_position_embeddings
        if max_len > mcfg.max_position_embeddings:
            # Positions past the model's rotary table were never trained (and are not in it).
            logger.warning(
                "max_model_len %d exceeds the model's max_position_embeddings %d; capping it",
                max_len,
                mcfg.max_position_embeddings,
            )
            max_len = mcfg.max_position_embeddings
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
        self.stats = SchedulerStats()
        self.scheduler = Scheduler(config, self.kv, self.max_model_len, self.stats)
        self.structured = StructuredOutputManager(self.vocab_size)

    # ---- requests in and out -------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """Queue one sequence (validated by the frontend; the engine checks only its own invariants)."""
        if request.max_tokens < 0 or len(request.prompt_token_ids) + request.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"request {request.request_id!r} does not fit the context of {self.max_model_len} tokens",
                param="max_tokens",
            )
        self.scheduler.add(Request.from_engine_request(request, self.runner.device))

    def abort_requests(
        self, request_ids: Iterable[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> list[str]:
        """Stop sequences now and free their blocks; returns the ids that were still running or waiting.
        A status other than aborted (a stop string the frontend matched) keeps the program's KV pin."""
        return self.scheduler.finish_requests(request_ids, status)

    def release_program(self, program_id: str) -> bool:
        """An agent program ended: unpin the KV kept for its next call, and forget its service."""
        self.scheduler.program_service.pop(program_id, None)
        return self.kv.release(program_id)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.requests)

    @property
    def num_unfinished(self) -> int:
        return len(self.scheduler.requests)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix no running request holds (for benchmarks that repeat prompts).
        Returns how many blocks were dropped."""
        return self.kv.reset_prefix_cache()

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> list[EngineCoreOutput]:
        """Run one scheduling step; returns what changed for each sequence that changed."""
        if self.kv.pins:
            self.kv.expire_pins()
        sched = self.scheduler.schedule()
        if not sched:
            if sched.finished_req_ids:
                self.runner.forget(sched.finished_req_ids)
            return []
        self.runner.update_states(sched)
        grammar = self.structured.bitmask_for(sched, self.scheduler.requests)  # filled during the forward
        try:
            result = self.runner.run(sched.num_scheduled_tokens, sched.spec_token_ids, grammar)
        except Exception as error:  # noqa: BLE001 - isolated below; the engine goes on
            logger.warning(
                "a step of %d requests failed (%s); isolating", len(sched.num_scheduled_tokens), error
            )
            if grammar is not None:
                grammar.wait()
            return self._isolate(sched, error, grammar)
        if grammar is not None:
            grammar.wait()  # a step whose sampling rows had no grammar never waited in apply()
        return self.scheduler.update_from_output(sched, result)

    def _isolate(
        self, sched: SchedulerOutput, error: Exception, grammar: StepBitmask | None = None
    ) -> list[EngineCoreOutput]:
        """A step failed: find the requests at fault by bisection and fail only them.

        The runner is all-or-nothing (no state moves, seeded generators restored), so each half is run
        as a step of its own, in batch order; a half that fails is split again, and a single request
        that fails alone is the culprit. The others get the step they would have had, a sub-batch at a
        time. Batch order matters: a request can hit, by prefix, blocks another admitted earlier in the
        same step is still to write; running halves in order keeps writers before readers, and a reader
        of a culprit's blocks is rewound (recomputed later) before it runs.
        """
        outputs: list[EngineCoreOutput] = []
        pending = [list(sched.num_scheduled_tokens.items())]
        while pending:
            batch = pending.pop()
            if not batch:
                continue
            if len(batch) == 1 and len(sched.num_scheduled_tokens) == 1:
                culprit, why = batch[0][0], error
            else:
                part = SchedulerOutput(
                    num_scheduled_tokens=dict(batch),
                    spec_token_ids={r: d for r, d in sched.spec_token_ids.items() if r in dict(batch)},
                )
                try:
                    result = self.runner.run(part.num_scheduled_tokens, part.spec_token_ids, grammar)
                except Exception as e:  # noqa: BLE001 - narrowed down below
                    if len(batch) > 1:
                        mid = len(batch) // 2
                        pending += [batch[mid:], batch[:mid]]  # the first half runs first
                        continue
                    culprit, why = batch[0][0], e
                else:
                    outputs += self.scheduler.update_from_output(part, result)
                    continue
            logger.error("request %s failed inside the engine step: %r", culprit, why)
            unwritten = self.scheduler.uncomputed_blocks(culprit)
            out = self.scheduler.fail(culprit, why)
            if out is not None:
                outputs.append(out)
            for waiting in pending:
                for item in list(waiting):
                    if unwritten.intersection(self.kv.block_ids(item[0])):
                        waiting.remove(item)
                        self.scheduler.rewind(item[0])
        return outputs
