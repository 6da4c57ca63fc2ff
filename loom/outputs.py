"""What the engine returns for a request."""

from __future__ import annotations

from dataclasses import dataclass, field

# One position's log-probabilities: {token_id: logprob}, the sampled token first, then the top ones.
TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """'stop' (EOS, a stop token or a stop string), 'length' (max_tokens or the context), 'abort', or None."""
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended it, if any."""
    logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: its prompt and its completions so far (or final)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache instead of being computed."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    metrics: dict = field(default_factory=dict)
    """Timestamps (arrival, first_scheduled, first_token, finished) in time.monotonic() seconds."""
