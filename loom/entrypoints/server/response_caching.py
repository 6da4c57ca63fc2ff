"""The response cache at the HTTP edge: which requests use it, their keys, and answering from it, as
JSON or replayed as an SSE stream. The cache itself is loom.entrypoints.response_cache.

Flow: a deterministic request is looked up before any tokenization; a hit is answered at once with a
fresh id and `created`; a miss runs, and its answer is stored only if it finished normally (the handlers
store after the engine's last output, so an error or a client that left never reaches the store).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from starlette.datastructures import Headers

from loom.entrypoints.response_cache import InMemoryResponseCache, cache_key
from loom.entrypoints.server import protocol as p
from loom.entrypoints.server.fields import new_id
from loom.sampling_params import SamplingParams

CACHE_HEADER = "x-loom-cache"
TRUNCATED_HEADER = "x-loom-truncated-tokens"

# Request fields SamplingParams resolves: the key holds the resolved values (defaults applied), so an
# omitted field and its default spelled out are the same request.
_RESOLVED_FIELDS = frozenset(
    {
        "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "min_tokens", "max_tokens", "max_completion_tokens", "stop", "stop_token_ids",
        "ignore_eos", "seed", "skip_special_tokens", "include_stop_str_in_output", "priority",
    }
)  # fmt: skip
# Fields that do not change the answer: scheduling and KV hints. (Delivery fields such as stream and
# the cache switch itself are left out by cache_key.) truncation is keyed as the policy in effect.
_HINT_FIELDS = frozenset({"program_id", "truncation"})


def normalized_request(body: p.SamplingRequest, params: SamplingParams, model: str, truncation: str) -> dict:
    """The request as the cache keys it: its full dump with the sampling fields as resolved."""
    request = body.model_dump(exclude=_RESOLVED_FIELDS | _HINT_FIELDS)
    sampling = asdict(params)
    del sampling["extra"], sampling["priority"]
    request.update(
        model=model,
        truncation=truncation,
        sampling=sampling,
        # cache_key decides determinism from these two.
        temperature=params.temperature,
        seed=params.seed,
    )
    return request


def bypassed(body: p.SamplingRequest, headers: Headers) -> bool:
    """Whether the client asked to skip the cache (`cache: false`, Cache-Control no-cache or no-store,
    or `x-loom-cache: bypass`)."""
    if body.cache is False:
        return True
    control = headers.get("cache-control", "").lower()
    if "no-cache" in control or "no-store" in control:
        return True
    return headers.get(CACHE_HEADER, "").strip().lower() == "bypass"


@dataclass
class CacheSlot:
    """One request's place in the response cache: its key (None: the cache is not used) and the hit."""

    cache: InMemoryResponseCache | None = None
    key: str | None = None
    hit: dict | None = None

    @property
    def active(self) -> bool:
        return self.cache is not None and self.key is not None

    def store(self, response: dict) -> None:
        """Keep a finished answer (put refuses any choice that did not end with stop/length/tool_calls)."""
        if self.cache is not None and self.key is not None:
            self.cache.put(self.key, response)


def lookup(
    cache: InMemoryResponseCache | None,
    endpoint: str,
    body: p.SamplingRequest,
    params: SamplingParams,
    model: str,
    truncation: str,
    headers: Headers,
) -> CacheSlot:
    if cache is None or bypassed(body, headers):
        return CacheSlot()
    key = cache_key(endpoint, normalized_request(body, params, model, truncation))
    if key is None:  # sampled without a seed: every answer differs
        return CacheSlot()
    return CacheSlot(cache, key, cache.get(key))


def reply_headers(hit: bool, truncated_tokens: int) -> dict[str, str]:
    headers = {CACHE_HEADER: "hit" if hit else "miss"}
    if truncated_tokens > 0:
        headers[TRUNCATED_HEADER] = str(truncated_tokens)
    return headers


def refreshed(response: dict, id_prefix: str) -> tuple[dict, dict[str, str]]:
    """A cached answer as a new response (fresh id and created) and the headers it goes out with."""
    response = {**response, "id": new_id(id_prefix), "created": int(time.time())}
    truncated = (response.get("usage") or {}).get("truncated_prompt_tokens") or 0
    return response, reply_headers(True, truncated)


# ---- replaying a cached answer as a stream --------------------------------------------------------


async def replay_chat(response: dict, include_usage: bool) -> AsyncIterator[p.ChatCompletionChunk]:
    """The chunks a live stream of this chat answer sends: the role first, then each choice's content,
    logprobs and tool calls in one delta, its finish reason, and the usage if asked for."""

    def chunk(choices: list[p.ChatStreamChoice], usage: dict | None = None) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(
            id=response["id"],
            created=response["created"],
            model=response["model"],
            choices=choices,
            usage=p.Usage(**usage) if usage is not None else None,
        )

    choices = response["choices"]
    for c in choices:
        yield chunk(
            [p.ChatStreamChoice(index=c["index"], delta=p.DeltaMessage(role="assistant", content=""))]
        )
    for c in choices:
        message, logprobs = c["message"], c.get("logprobs")
        content, calls = message.get("content"), message.get("tool_calls") or []
        if content or calls or logprobs:
            deltas = [
                p.DeltaToolCall(
                    index=j,
                    id=call["id"],
                    type="function",
                    function=p.DeltaFunctionCall(**call["function"]),
                )
                for j, call in enumerate(calls)
            ]
            delta = p.DeltaMessage(content=content or (None if calls else ""), tool_calls=deltas or None)
            yield chunk(
                [
                    p.ChatStreamChoice(
                        index=c["index"],
                        delta=delta,
                        logprobs=p.ChoiceLogprobs(**logprobs) if logprobs else None,
                    )
                ]
            )
        yield chunk(
            [p.ChatStreamChoice(index=c["index"], delta=p.DeltaMessage(), finish_reason=c["finish_reason"])]
        )
    if include_usage:
        yield chunk([], response["usage"])


async def replay_completion(response: dict, include_usage: bool) -> AsyncIterator[p.CompletionResponse]:
    """One chunk per choice (its whole text, logprobs and finish reason), then the usage if asked for."""

    def chunk(choices: list[p.CompletionChoice], usage: dict | None = None) -> p.CompletionResponse:
        return p.CompletionResponse(
            id=response["id"],
            created=response["created"],
            model=response["model"],
            choices=choices,
            usage=p.Usage(**usage) if usage is not None else None,
        )

    for c in response["choices"]:
        yield chunk([p.CompletionChoice(**c)])
    if include_usage:
        yield chunk([], response["usage"])
