"""The typed values one engine step passes from scheduler to runner and back (vLLM V1's shape).

The scheduler names requests by id and sends the runner only what it cannot know: a request the runner
has not seen (or was told to forget, as a preempted one is) comes whole as NewRequestData; one it holds
comes as the blocks added since and the computed count this step starts from. The runner keeps the rest
(tokens, including the ones it sampled, block tables, generators) in its own per-request state and
answers with a ModelRunnerOutput of plain values. `Scheduler.update_from_output` is the one place that
advances `num_computed_tokens` and appends tokens to requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loom.multimodal.inputs import ImageInput
from loom.outputs import TokenLogprobs
from loom.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the runner does not hold: everything it needs to run it from here on."""

    req_id: str
    token_ids: list[int]
    """Prompt and the output so far (a preempted request resumes with what it had generated)."""
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    """Tokens whose KV is already in the cache (a prefix hit) before this step's tokens."""
    params: SamplingParams
    generator: torch.Generator | None
    eos_token_ids: frozenset[int]
    images: tuple[ImageInput, ...] = ()
    mrope_positions: torch.Tensor | None = None
    mrope_delta: int = 0


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner holds: what changed since it last ran."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """One step's batch. `num_scheduled_tokens` is in the order the tokens are laid out in the forward."""

    new_reqs: list[NewRequestData] = field(default_factory=list)
    cached_reqs: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    """Draft tokens to verify per request (they follow its last token, inside num_scheduled_tokens)."""
    finished_req_ids: set[str] = field(default_factory=set)
    """Requests the runner must forget before this step (finished, aborted or preempted since the last)."""
    preempted_req_ids: list[str] = field(default_factory=list)
    """Requests this step preempted (also in finished_req_ids)."""

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    def __bool__(self) -> bool:
        return bool(self.num_scheduled_tokens)


@dataclass
class ModelRunnerOutput:
    """What the runner computed: a row per request that sampled, in batch order."""

    req_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    """Tokens sampled for each request of req_ids: its accepted drafts, then one more."""
    logprobs: list[list[TokenLogprobs] | None] = field(default_factory=list)
    """Per request of req_ids, one entry per sampled token, or None when it asked for none."""
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """req_id -> logprobs of the prompt tokens this step's chunk predicts (positions ctx + 1 ...)."""
