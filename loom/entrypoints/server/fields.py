"""OpenAI request fields -> SamplingParams, and the small conversions responses share (ids, logprobs,
usage)."""

from __future__ import annotations

import uuid

from loom.entrypoints.server.protocol import SamplingRequest, Usage
from loom.errors import InvalidRequest
from loom.sampling_params import SamplingParams

# Logprobs are floats in JSON; -inf (a token masked by top-k/top-p) is not valid JSON, so clamp it.
MIN_LOGPROB = -9999.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(
    body: SamplingRequest,
    max_n: int,
    max_tokens: int | None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    renamed: dict[str, str] | None = None,
) -> SamplingParams:
    """SamplingParams from the fields chat and completions share (OpenAI defaults for missing ones).

    `renamed` maps SamplingParams names to the request's own, so a range error names the field the
    client sent (chat's top_logprobs is SamplingParams.logprobs).
    """
    n = 1 if body.n is None else body.n
    if n > max_n:
        raise InvalidRequest(f"n may be at most {max_n}, got {n}", param="n")
    logit_bias = None
    if body.logit_bias:
        try:  # OpenAI's keys are token ids written as strings
            logit_bias = {int(k): v for k, v in body.logit_bias.items()}
        except ValueError:
            raise InvalidRequest("logit_bias keys must be token ids (integers)", param="logit_bias") from None

    def given(value, default):
        return default if value is None else value

    try:
        return SamplingParams(
            n=n,
            max_tokens=max_tokens,
            min_tokens=given(body.min_tokens, 0),
            temperature=given(body.temperature, 1.0),
            top_p=given(body.top_p, 1.0),
            top_k=given(body.top_k, -1),
            min_p=given(body.min_p, 0.0),
            presence_penalty=given(body.presence_penalty, 0.0),
            frequency_penalty=given(body.frequency_penalty, 0.0),
            repetition_penalty=given(body.repetition_penalty, 1.0),
            stop=body.stop,
            stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos,
            seed=body.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            priority=given(body.priority, 0),
            logit_bias=logit_bias,
            bad_words=body.bad_words,
            extra={"program_id": body.program_id} if body.program_id else {},
        )
    except InvalidRequest as e:
        e.param = (renamed or {}).get(e.param, e.param)
        raise


def finite_logprob(value: float) -> float:
    return value if value > MIN_LOGPROB else MIN_LOGPROB  # also maps NaN to the floor


def top_items(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely (token, logprob) of one position (the dict holds the chosen token and the top)."""
    return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:k]


def usage(
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    truncated_tokens: int = 0,
    dropped_messages: int | None = None,
) -> Usage:
    """`dropped_messages` is chat's (None for completions); both extensions appear only when cut."""
    cut = truncated_tokens > 0
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details={"cached_tokens": cached_tokens},
        truncated_prompt_tokens=truncated_tokens if cut else None,
        dropped_messages=dropped_messages if cut else None,
    )


def stream_usage(body: SamplingRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage
