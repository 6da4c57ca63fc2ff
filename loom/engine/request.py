"""One sequence the engine is generating. Scheduling is in tokens: `num_computed_tokens` catches up with
`num_tokens`; a fresh prompt, a chunked prefill, a decode and a prefix-cache hit are all that one number."""

from __future__ import annotations

import enum
import time

import torch

from loom.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """A sequence: its tokens, how many of them have KV in the cache, and how to sample the next one.

    A request with n > 1 is n of these (one per completion) sharing a `parent_id`; the prefix cache
    makes them share the prompt's KV.
    """

    __slots__ = (
        "request_id",
        "parent_id",
        "index",
        "prompt_token_ids",
        "output_token_ids",
        "all_token_ids",
        "params",
        "max_tokens",
        "arrival_time",
        "status",
        "num_computed_tokens",
        "num_cached_tokens",
        "generator",
        "stop_reason",
        "num_preemptions",
        "num_skipped",
        "first_scheduled_time",
        "first_token_time",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        parent_id: str | None = None,
        index: int = 0,
        arrival_time: float | None = None,
        generator: torch.Generator | None = None,
    ):
        self.request_id = request_id
        self.parent_id = parent_id if parent_id is not None else request_id
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1
        self.generator = generator
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.num_skipped = 0  # times the cache-aware scheduler admitted a later request first
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def priority(self) -> int:
        return self.params.priority

    @property
    def program_id(self) -> str | None:
        """The agent program (workflow run) this call belongs to, if the caller said."""
        return self.params.extra.get("program_id")

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )
