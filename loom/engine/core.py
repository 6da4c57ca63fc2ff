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
        result = self.runner.execute(sched)
        return self.scheduler.update_from_output(sched, result)
