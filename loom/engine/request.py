"""One sequence the engine is generating. Scheduling is in tokens: `num_computed_tokens` catches up with
`num_tokens`; a fresh prompt, a chunked prefill, a decode and a prefix-cache hit are all that one number."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import torch

from loom.engine.io import EngineRequest
from loom.multimodal.inputs import ImageInput
from loom.sampling_params import SamplingParams

if TYPE_CHECKING:
    from loom.engine.structured import GrammarMatcher


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6
    """The engine failed while running this request (it alone: the others in its step went on)."""

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """A sequence: its tokens, how many of them have KV in the cache, and how to sample the next one.

    Owned by the scheduler, which is its only writer; the runner never sees it (it gets the typed values
    of loom/engine/step.py). A request for n completions arrives as n of these sharing a `parent_id`;
    the prefix cache makes them share the prompt's KV.
    """

    __slots__ = (
        "request_id",
        "parent_id",
        "prompt_token_ids",
        "output_token_ids",
        "all_token_ids",
        "params",
        "max_tokens",
        "eos_token_ids",
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
        "num_blocks_sent",
        "images",
        "mrope_positions",
        "mrope_delta",
        "grammar",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        parent_id: str | None = None,
        arrival_time: float | None = None,
        generator: torch.Generator | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
        images: tuple[ImageInput, ...] = (),
        mrope_positions: torch.Tensor | None = None,
        mrope_delta: int = 0,
    ):
        self.request_id = request_id
        self.parent_id = parent_id if parent_id is not None else request_id
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
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
        self.num_blocks_sent = -1
        """Block ids the runner holds for it; -1 while the runner does not hold the request at all."""
        self.images = images
        self.mrope_positions = mrope_positions
        self.mrope_delta = mrope_delta
        self.grammar: GrammarMatcher | None = None
        """Its grammar state, advanced with each output token (see loom/engine/structured/engine.py)."""

    @classmethod
    def from_engine_request(cls, er: EngineRequest, device: torch.device) -> Request:
        generator = None
        if er.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(er.seed)
        req = cls(
            er.request_id,
            list(er.prompt_token_ids),
            er.params,
            er.max_tokens,
            parent_id=er.parent_id,
            arrival_time=er.arrival_time,
            generator=generator,
            eos_token_ids=er.eos_token_ids,
            images=er.images,
            mrope_positions=er.mrope_positions,
            mrope_delta=er.mrope_delta,
        )
        if er.grammar is not None:
            req.grammar = er.grammar.matcher()
        return req

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
    def mm_spans(self) -> list[tuple[int, int, str]]:
        """(offset, length, key) of each image's placeholder run, for the prefix cache's block hashes."""
        return [(im.offset, im.length, im.cache_key) for im in self.images]

    @property
    def skip_prefix_cache(self) -> bool:
        """Prompt logprobs need every prompt position computed, so such a request takes no prefix hits."""
        return self.params.prompt_logprobs is not None

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
