"""What crosses the frontend/engine boundary: an EngineRequest in, EngineCoreOutputs out.

The engine sees token ids, never text: rendering, tokenizing, stop strings and detokenizing live in
loom/frontend. One EngineRequest is one sequence; a request for `n` completions is fanned out into n
of them by the frontend, which also gathers their outputs back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loom.multimodal.inputs import ImageInput
from loom.outputs import TokenLogprobs
from loom.sampling_params import SamplingParams

if TYPE_CHECKING:
    from loom.engine.structured import CompiledGrammar


@dataclass(slots=True)
class EngineRequest:
    """One sequence for the engine, already validated against the model by the frontend."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    """Tokens to generate at most (the frontend resolved None to what the context leaves)."""
    eos_token_ids: frozenset[int] = frozenset()
    """Tokens that end the sequence unless params.ignore_eos (the tokenizer's and the model's EOS)."""
    seed: int | None = None
    """This sequence's own seed (the frontend derives one per completion from the request's)."""
    parent_id: str | None = None
    """The caller's request id when this is one of its n sequences (program scheduling groups by it)."""
    arrival_time: float | None = None
    images: tuple[ImageInput, ...] = ()
    """The prompt's images, in order, each at its run of placeholder tokens."""
    mrope_positions: torch.Tensor | None = None
    """[3, num_prompt_tokens] M-RoPE positions of a prompt with images (None: plain positions)."""
    mrope_delta: int = 0
    """Generated token i (i >= the prompt's length) is at position i + mrope_delta on every axis."""
    grammar: CompiledGrammar | None = None
    """The grammar the output must match (compiled by the frontend); the engine runs one matcher per
    sequence from it."""


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step did for one sequence: tokens it appended, prompt logprobs it computed, whether it
    finished. Only sequences with something to report get one."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] | None = None
    """One entry per new token, when the request asked for logprobs."""
    prompt_logprobs: list[TokenLogprobs] | None = None
    """Logprobs of prompt tokens at positions prompt_logprobs_start, prompt_logprobs_start + 1, ..."""
    prompt_logprobs_start: int = 0
    finish_reason: str | None = None
    """'stop', 'length', 'abort' or 'error' once the sequence finished."""
    error: str | None = None
    """Why the engine failed this sequence (finish_reason 'error'); the caller's request fails with it."""
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache when the sequence was first admitted."""
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
