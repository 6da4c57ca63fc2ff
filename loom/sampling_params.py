"""SamplingParams: how one request is decoded. Validation here is what the server's 400s come from."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loom.errors import InvalidRequest

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
# What torch.Generator.manual_seed accepts: a negative seed is taken modulo 2**64, so the range is
# [-2**63, 2**64 - 1]; outside it manual_seed overflows inside the engine step.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1


@dataclass
class SamplingParams:
    """Decoding parameters of one request (the names and meanings follow OpenAI and vLLM)."""

    n: int = 1
    """Number of completions to return for the prompt."""
    max_tokens: int | None = 16
    """Most tokens to generate per completion; None means up to the context length."""
    min_tokens: int = 0
    """Fewest tokens to generate before EOS or a stop token may end the completion."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 keeps all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's, in [0, 1]."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit per time it was generated, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """CTRL-style: logits of tokens in the prompt or output are divided (if > 0) or multiplied by it; > 0."""
    stop: list[str] | str | None = None
    """Strings that end the completion; the matched string is not included in the text."""
    stop_token_ids: list[int] | None = None
    """Token ids that end the completion (in addition to EOS unless ignore_eos)."""
    ignore_eos: bool = False
    """Keep generating past EOS tokens."""
    seed: int | None = None
    """Per-request seed in [-2**63, 2**64 - 1]: the same seed gives the same tokens whatever else is in the batch."""
    logprobs: int | None = None
    """Return the log-probabilities of the sampled token and of the top `logprobs` tokens (0 to 20)."""
    prompt_logprobs: int | None = None
    """Return log-probabilities of the prompt tokens (with this many top alternatives), e.g. for echo."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    priority: int = 0
    """Scheduling priority: lower values run first; ties keep arrival order."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids before sampling, each in [-100, 100] (OpenAI's logit_bias)."""
    bad_words: list[str] | None = None
    """Words that may not be generated (vLLM): the last token of a word is banned where the tokens before it were just generated; the frontend tokenizes them into bad_words_token_ids."""
    bad_words_token_ids: list[list[int]] | None = None
    """Token sequences that may not be generated (from bad_words, with and without a leading space)."""
    structured_outputs: dict | None = None
    """A grammar the output must match, as vLLM's structured_outputs: exactly one of {"json": schema}, {"regex": ...}, {"choice": [...]}, {"grammar": lark_or_gbnf}, {"json_object": true}; compiled by the frontend."""
    extra: dict = field(default_factory=dict)
    """Free-form extension fields carried with the request (not used by the engine)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(param: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"{param} {why}", param=param)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise bad("max_tokens", f"must be an integer >= 0, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise bad(name, f"must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k == 0 or self.top_k < -1:
            raise bad("top_k", f"must be -1 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", "strings must be non-empty")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", "must map token ids to numbers")
            for token, value in self.logit_bias.items():
                if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                    raise bad("logit_bias", f"keys must be token ids (integers >= 0), got {token!r}")
                if (
                    not isinstance(value, (int, float))
                    or isinstance(value, bool)
                    or not math.isfinite(value)
                    or not -100 <= value <= 100
                ):
                    raise bad("logit_bias", f"values must be numbers in [-100, 100], got {value!r}")
        if self.bad_words is not None and (
            not isinstance(self.bad_words, list) or not all(isinstance(w, str) and w for w in self.bad_words)
        ):
            raise bad("bad_words", "must be a list of non-empty strings")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, dict):
            raise bad("structured_outputs", "must be an object")
        if not isinstance(self.priority, int):
            raise bad("priority", f"must be an integer, got {self.priority!r}")
        if self.seed is not None and (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not MIN_SEED <= self.seed <= MAX_SEED
        ):
            raise bad("seed", f"must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def deterministic(self) -> bool:
        """Same request, same output: greedy, or seeded."""
        return self.greedy or self.seed is not None
