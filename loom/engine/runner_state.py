"""The runner's own view of the requests it runs, kept up to date from each SchedulerOutput.

The scheduler sends a request whole once (NewRequestData) and afterwards only what changed; the tokens
the runner samples it appends here itself, so a decode step needs no token ids from the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.engine.step import SchedulerOutput
from loom.multimodal.inputs import ImageInput
from loom.sampling_params import SamplingParams


@dataclass(slots=True)
class CachedRequestState:
    req_id: str
    token_ids: list[int]
    """Prompt, then every token generated so far (including the last one sampled here)."""
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    eos_token_ids: frozenset[int]
    images: tuple[ImageInput, ...] = ()
    mrope_positions: torch.Tensor | None = None
    mrope_delta: int = 0

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def samples(self, num_new: int, num_drafts: int = 0) -> bool:
        """Whether a step computing num_new tokens (num_drafts of them drafts) reaches the end of the known
        tokens (so it samples)."""
        return self.num_computed_tokens + num_new - num_drafts == len(self.token_ids)


class RequestStates:
    """req_id -> CachedRequestState, updated by `update(scheduler_output)` before each step runs."""

    def __init__(self) -> None:
        self.states: dict[str, CachedRequestState] = {}

    def __getitem__(self, req_id: str) -> CachedRequestState:
        return self.states[req_id]

    def __len__(self) -> int:
        return len(self.states)

    def update(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            self.states.pop(req_id, None)
        for new in sched.new_reqs:
            self.states[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                params=new.params,
                generator=new.generator,
                eos_token_ids=new.eos_token_ids,
                images=new.images,
                mrope_positions=new.mrope_positions,
                mrope_delta=new.mrope_delta,
            )
        for cached in sched.cached_reqs:
            state = self.states[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            # The scheduler's count is the truth (speculative decoding may have rejected tokens).
            state.num_computed_tokens = cached.num_computed_tokens

    def advance(self, req_id: str, num_new: int, sampled: list[int], num_drafts: int = 0) -> None:
        """After the step: its tokens are computed but rejected drafts, and the sampled ones (accepted
        drafts, then one more) are next."""
        state = self.states[req_id]
        num_accepted = max(0, len(sampled) - 1) if num_drafts else 0
        state.num_computed_tokens += num_new - num_drafts + num_accepted
        state.token_ids.extend(sampled)
