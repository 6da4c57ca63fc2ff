"""OpenAI wire format: pydantic models of the requests we accept and the responses we send.

Requests allow unknown fields (clients send many we do not use) but are strict about the types of the
ones they declare, as their JSON schema says: `"max_tokens": "2"` or `"stream": 1` is a 400, and a
boolean is never a token id. Ranges are checked by SamplingParams and the handlers, so each error names
the OpenAI parameter it concerns.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_serializer, model_validator

from loom.errors import InvalidRequest

TokenId = StrictInt
"""A token id: an integer, never a boolean or a float (lax validation would read `false` as token 0)."""

# A lone UTF-16 surrogate ("\ud800" in JSON) decodes into a Python str but cannot be encoded as UTF-8,
# so the tokenizer, the chat template and even the error response would fail on it later.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _strings(body: Any) -> Iterator[tuple[str | None, str, str]]:
    """(top-level field, where, string) of every string in a parsed JSON body, keys included; iterative,
    as JSON nests as deep as the parser allows."""
    stack: list[tuple[Any, str | None, str]] = [(body, None, "")]
    while stack:
        value, field, path = stack.pop()
        if isinstance(value, str):
            yield field, path or "the body", value
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str):
                    yield field, f"a key of {path or 'the body'}", key
                stack.append((item, field or str(key), f"{path}.{key}" if path else str(key)))
        elif isinstance(value, list):
            stack.extend((item, field, f"{path}[{i}]") for i, item in enumerate(value))


def check_unicode(body: Any) -> None:
    """Raise InvalidRequest naming the first field of a parsed request body that holds a lone surrogate."""
    for field, where, text in _strings(body):
        if _SURROGATE.search(text):
            raise InvalidRequest(
                f"{where} contains a lone UTF-16 surrogate, which is not valid Unicode (send text as "
                "UTF-8, or a character outside the BMP as a surrogate pair)",
                param=field,
            )


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


# ---- requests ----------------------------------------------------------------------------------------


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    """Send one last chunk with the usage of the whole request (its `choices` is empty)."""


class FunctionDefinition(OpenAIModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCall(OpenAIModel):
    name: str
    arguments: str
    """A JSON object, serialized."""


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    """A string, or a list of content parts ({"type": "text", "text": ...}; other kinds are refused)."""
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class SamplingRequest(OpenAIModel):
    """Fields chat and completions requests share; the defaults are OpenAI's."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # One check over the whole parsed body covers every string that can reach the tokenizer or the
        # template (prompt, content parts, roles, tool names and schemas, stop strings, ...).
        check_unicode(data)
        return data

    model: str | None = None
    # None means "not given" (OpenAI accepts explicit nulls); the handlers apply OpenAI's defaults.
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM's names).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int | None = None
    program_id: str | None = None
    """The agent program (workflow run) this call belongs to: the engine keeps its KV pinned for the next call."""
    truncation: str | None = None
    """What to do if the prompt does not fit (error, left, drop_turns); None: the server's --truncation."""
    cache: bool | None = None
    """False: this request neither reads nor fills the response cache."""
    bad_words: list[str] | None = None
    """vLLM: words the output may not contain (their last token is banned after the others)."""
    prompt_logprobs: int | None = None
    """vLLM: log-probabilities of the prompt tokens, with this many alternatives each (not with stream)."""
    # Structured output (loom/engine/structured/requests.py says what each may hold).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    """OpenAI's newer name for max_tokens; wins when both are given."""
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    """False: a forced tool call is exactly one call (default: one or more)."""


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


# ---- responses ---------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    # Extensions, sent only when a truncation policy cut the prompt (prompt_tokens counts what ran).
    truncated_prompt_tokens: int | None = None
    dropped_messages: int | None = None
    """Chat only: whole messages dropped by drop_turns (0 under left)."""

    @model_serializer(mode="wrap")
    def _drop_unset_extensions(self, handler):
        out = handler(self)
        for name in ("truncated_prompt_tokens", "dropped_messages"):
            if out.get(name) is None:
                out.pop(name, None)
        return out


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class PromptLogprob(BaseModel):
    """vLLM's form of one prompt position's alternatives (keyed by token id as a string)."""

    logprob: float
    rank: int | None = None
    """1 for the most likely token; None for a prompt token outside the top alternatives asked for."""
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]
"""One entry per prompt token; the first is None (nothing predicts it)."""


class _DropNullPromptLogprobs(BaseModel):
    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        out = handler(self)
        if out.get("prompt_logprobs") is None:
            out.pop("prompt_logprobs", None)
        return out


class ChatCompletionResponse(_DropNullPromptLogprobs):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    """vLLM extension, sent only when asked for."""


class _DropNone(BaseModel):
    """Stream deltas carry only what changed, as OpenAI's do: unset (None) fields are left out."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_DropNone):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_DropNone):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_DropNone):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_DropNullPromptLogprobs):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    prompt_logprobs: PromptLogprobs | None = None
    """vLLM extension, sent only when asked for."""


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loom"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Status(BaseModel):
    status: str
    """"ok" (/health) or "ready" (/ready)."""


class Released(BaseModel):
    released: bool


class ErrorDetail(BaseModel):
    message: str
    type: str
    """invalid_request_error, authentication_error, rate_limit_error, service_unavailable_error, ..."""
    param: str | None
    """The request field at fault, when there is one."""
    code: str | None


class ErrorResponse(BaseModel):
    """Every error the server answers, whatever its status (OpenAI's format)."""

    error: ErrorDetail
