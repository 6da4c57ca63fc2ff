"""Chat clients: one small protocol, implemented in-process on loom's engine and over the OpenAI API.

Every call may carry a `program_id` (the run it belongs to) so that the serving side can keep one
program's requests, and the prefixes they share, together.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

from loom.config import EngineConfig
from loom.engine.async_engine import AsyncEngine
from loom.engine.structured import request_grammar
from loom.entrypoints.llm import merge_delta
from loom.errors import EngineDeadError, InvalidRequest
from loom.frontend.chat import process_chat, render_chat
from loom.frontend.input_processor import ProcessedRequest
from loom.frontend.structured import tool_format
from loom.frontend.tool_parsers import ToolCallStream
from loom.sampling_params import SamplingParams
from loom.tracing import trace_headers

logger = logging.getLogger(__name__)

TokenCallback = Callable[[str], None]
"""Called with each piece of reply text as it is generated."""

# Sampling parameters the OpenAI API names itself; the rest travel in extra_body (vLLM and loom read them).
OPENAI_SAMPLING = frozenset(
    {"max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty"}
)
_SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams)) - {"n", "extra"}


@dataclass(slots=True)
class Usage:
    """Tokens of one or more calls; cached_tokens are prompt tokens served from the prefix cache."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    calls: int = 0

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.calls += other.calls


@dataclass
class ToolCall:
    """A call the model asked for; `arguments` is JSON text, exactly as the model wrote it."""

    id: str
    name: str
    arguments: str


@dataclass
class ChatResult:
    """One chat completion: reply text, tool calls, and token usage."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None

    def message(self) -> dict:
        """The assistant turn in OpenAI format, to append to the conversation."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        return message


@runtime_checkable
class ChatClient(Protocol):
    """What the runtime needs from a model: one chat completion, optionally streamed through on_token.

    A client may also have `end_program(program_id)`, which the runtime calls when a run ends so the
    serving side can let go of what it kept for the program (EngineClient unpins its KV).
    """

    async def chat(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        *,
        program_id: str | None = None,
        on_token: TokenCallback | None = None,
        **sampling: Any,
    ) -> ChatResult: ...


class EngineClient:
    """Chats with an in-process AsyncEngine: no HTTP, the engine's own chat template and tool parser."""

    def __init__(self, engine: AsyncEngine, tool_parser: str = "auto", default_max_tokens: int = 512):
        self.engine = engine
        self.tool_parser = tool_parser
        """Tool-call format to read: auto, hermes or glm4 (see loom.frontend.tool_parsers)."""
        self.default_max_tokens = default_max_tokens

    @classmethod
    @asynccontextmanager
    async def launch(cls, config: EngineConfig, **kwargs: Any) -> AsyncIterator[EngineClient]:
        """Start an engine on the running loop, yield a client on it, stop the engine on exit."""
        engine = AsyncEngine(config)
        engine.start(asyncio.get_running_loop())
        try:
            await asyncio.to_thread(engine.wait_ready)
            yield cls(engine, **kwargs)
        finally:
            await asyncio.to_thread(engine.stop)

    def end_program(self, program_id: str) -> None:
        """The run ended: unpin the KV the engine kept for the program's next call."""
        self.engine.release_program(program_id)

    def _params(self, sampling: dict[str, Any], program_id: str | None) -> SamplingParams:
        unknown = sorted(set(sampling) - _SAMPLING_FIELDS)
        if unknown:
            raise InvalidRequest(f"unknown sampling parameters {unknown}", param="sampling")
        sampling.setdefault("max_tokens", self.default_max_tokens)
        return SamplingParams(**sampling, extra={"program_id": program_id} if program_id else {})

    async def chat(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        *,
        program_id: str | None = None,
        on_token: TokenCallback | None = None,
        **sampling: Any,
    ) -> ChatResult:
        ip = self.engine.input
        if ip is None or not self.engine.is_ready:
            raise EngineDeadError("the engine is not ready; call start() and wait_ready() first")
        sampling = dict(sampling)
        structured = sampling.pop("structured_outputs", None)
        params = self._params(sampling, program_id)
        request_id = f"{program_id or 'chat'}-{uuid.uuid4().hex[:12]}"

        def prepare() -> ProcessedRequest:
            grammar = None
            if structured is not None:  # with tools: a reply matching it, or tool calls
                fmt = tool_format(ip.tokenizer, self.tool_parser) if tools else "hermes"
                spec = request_grammar(structured_outputs=structured, tools=tools or None, tool_format=fmt)
                grammar = ip.grammars.compile(spec)
            budget = ip.prompt_budget(params.max_tokens)
            prompt = render_chat(ip, messages, tools or None, self.tool_parser, budget, "error")
            return process_chat(ip, request_id, prompt, params, grammar)

        job = await asyncio.to_thread(prepare)
        names = {t["function"]["name"] for t in tools or ()}
        # One parser for the streamed and the final text, so tool-call markup never reaches on_token.
        parser = ToolCallStream(names, self.tool_parser) if names else None
        final = None
        content: list[str] = []
        async for delta in self.engine.generate(job):
            final = merge_delta(final, delta)
            text = "".join(c.text for c in delta.outputs if c.index == 0)
            if parser is not None:
                text = parser.feed(text)[0]
                if delta.finished:
                    text += parser.finish()[0]
            if text:
                content.append(text)
                if on_token is not None:
                    on_token(text)
        out = final.outputs[0]
        calls = [ToolCall(c.id, c.name, c.arguments) for c in parser.calls] if parser else []
        usage = Usage(len(job.prompt_token_ids), len(out.token_ids), final.num_cached_tokens, calls=1)
        text = "".join(content)
        if calls and not text.strip():  # the newline between parallel calls is not a reply
            text = ""
        return ChatResult(text, calls, usage, "tool_calls" if calls else out.finish_reason)


class OpenAIClient:
    """Chats over any OpenAI-compatible API (loom's server, vLLM, a hosted model) with the openai SDK."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        *,
        client: Any = None,
        **client_kwargs: Any,
    ):
        """`model` None asks the server's /v1/models for its first model; `client` replaces the
        AsyncOpenAI client (client_kwargs, e.g. http_client or timeout, go to AsyncOpenAI)."""
        if client is None:
            from openai import AsyncOpenAI

            # The SDK insists on a key; local servers without auth ignore whatever is sent.
            api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
            client = AsyncOpenAI(base_url=base_url, api_key=api_key, **client_kwargs)
        self.client = client
        self.model = model
        self._releases: set[asyncio.Task] = set()

    def end_program(self, program_id: str) -> None:
        """The run ended: ask a loom server to unpin the program's KV now rather than at its TTL.
        Sent in the background; other servers answer 404, which is ignored."""
        task = asyncio.get_running_loop().create_task(self._release(program_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, program_id: str) -> None:
        try:
            await self.client.post(f"/programs/{program_id}/release", cast_to=object)
        except Exception as e:  # noqa: BLE001 - best effort; pins expire on their own
            logger.debug("release of program %s not done: %s", program_id, e)

    async def _model(self) -> str:
        if self.model is None:
            page = await self.client.models.list()
            if not page.data:
                raise InvalidRequest("the server lists no models; pass model=", param="model")
            self.model = page.data[0].id
        return self.model

    async def chat(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        *,
        program_id: str | None = None,
        on_token: TokenCallback | None = None,
        **sampling: Any,
    ) -> ChatResult:
        sampling = dict(sampling)
        structured = sampling.pop("structured_outputs", None)
        kwargs = {k: v for k, v in sampling.items() if k in OPENAI_SAMPLING}
        extra = {k: v for k, v in sampling.items() if k not in OPENAI_SAMPLING}
        if structured is not None:
            kwargs["response_format"] = _response_format(structured)
            if kwargs["response_format"] is None:  # a regex or grammar: vLLM's (and loom's) extension
                del kwargs["response_format"]
                extra["structured_outputs"] = structured
        if program_id:
            extra["program_id"] = program_id
        if tools:
            kwargs["tools"] = tools
        kwargs.update(model=await self._model(), messages=messages, extra_body=extra or None)
        # The current span (a workflow node's) as `traceparent`, so the server's spans join the run's trace.
        kwargs["extra_headers"] = trace_headers() or None
        if on_token is None:
            return _from_response(await self.client.chat.completions.create(**kwargs))
        stream = await self.client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        return await _from_stream(stream, on_token)


def _response_format(structured: dict) -> dict | None:
    """OpenAI's response_format for a JSON constraint (any OpenAI-compatible server takes it), else None."""
    if set(structured) == {"json"}:
        schema = structured["json"]
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": False}}
    if set(structured) == {"json_object"}:
        return {"type": "json_object"}
    return None


def _usage(usage: Any) -> Usage:
    if usage is None:
        return Usage(calls=1)
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
    return Usage(usage.prompt_tokens or 0, usage.completion_tokens or 0, cached, calls=1)


def _from_response(response: Any) -> ChatResult:
    choice = response.choices[0]
    message = choice.message
    calls = [
        ToolCall(c.id, c.function.name, c.function.arguments or "{}")
        for c in message.tool_calls or ()
        if getattr(c, "function", None) is not None
    ]
    return ChatResult(message.content or "", calls, _usage(response.usage), choice.finish_reason)


async def _from_stream(stream: Any, on_token: TokenCallback) -> ChatResult:
    content: list[str] = []
    calls: dict[int, dict[str, str]] = {}  # tool calls arrive in pieces, keyed by index
    usage, finish_reason = None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            delta = choice.delta
            if delta.content:
                content.append(delta.content)
                on_token(delta.content)
            for piece in delta.tool_calls or ():
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = piece.id or call["id"]
                if piece.function is not None:
                    call["name"] += piece.function.name or ""
                    call["arguments"] += piece.function.arguments or ""
            finish_reason = choice.finish_reason or finish_reason
    tool_calls = [
        ToolCall(c["id"] or f"call_{uuid.uuid4().hex[:24]}", c["name"], c["arguments"] or "{}")
        for _, c in sorted(calls.items())
    ]
    return ChatResult("".join(content), tool_calls, _usage(usage), finish_reason)
