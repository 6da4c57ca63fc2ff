"""POST /v1/chat/completions: messages and tools through the chat template, tool calls parsed back out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from loom.entrypoints.llm import merge_delta
from loom.entrypoints.server import protocol as p
from loom.entrypoints.server.fields import (
    finite_logprob,
    new_id,
    sampling_params,
    stream_usage,
    top_items,
    usage,
)
from loom.entrypoints.server.response_caching import (
    CacheSlot,
    lookup,
    refreshed,
    replay_chat,
    reply_headers,
)
from loom.entrypoints.server.serving import ServerState
from loom.entrypoints.server.sse import SSEResponse, sse_events
from loom.entrypoints.server.structured import check_prompt_logprobs, compile_grammar, prompt_logprobs_json
from loom.errors import InvalidRequest
from loom.frontend.chat import ChatPrompt, process_chat, render_chat
from loom.frontend.input_processor import ProcessedRequest
from loom.frontend.tool_parsers import ToolCall, ToolCallStream, parse_tool_calls
from loom.outputs import CompletionOutput, RequestOutput
from loom.sampling_params import MAX_LOGPROBS
from loom.tokenizer import Tokenizer


def _messages(body: p.ChatCompletionRequest) -> list[dict]:
    if not body.messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    messages = []
    for i, message in enumerate(body.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                kind = part.get("type")
                if kind == "image_url":
                    continue  # loaded (or refused, for a text-only model) by the frontend
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(
                        f"messages[{i}].content[{j}] is a {kind!r} part; parts are 'text' (with a string "
                        "'text') or 'image_url'",
                        param="messages",
                    )
        messages.append(message.model_dump(exclude_none=True))
    return messages


def _tools(body: p.ChatCompletionRequest) -> tuple[list[dict] | None, str | None]:
    """(tools for the template, forced function name or "" for any function, or None when not forced)."""
    choice = body.tool_choice
    tools = body.tools or []
    if choice is not None and choice not in ("none", "auto") and not tools:
        raise InvalidRequest("tool_choice requires tools", param="tool_choice")
    if not tools or choice == "none":
        return None, None
    dumped = [t.model_dump(exclude_none=True) for t in tools]
    if isinstance(choice, p.NamedToolChoice):
        named = [t for t in dumped if t["function"]["name"] == choice.function.name]
        if not named:
            raise InvalidRequest(
                f"tool_choice names an undeclared function {choice.function.name!r}", "tool_choice"
            )
        return named, choice.function.name
    return dumped, ("" if choice == "required" else None)


def chat_logprobs(state: ServerState, tokenizer: Tokenizer, c: CompletionOutput, k: int) -> p.ChoiceLogprobs:
    content = []
    for token_id, entry in zip(c.token_ids, c.logprobs or [], strict=False):
        text = state.token_text(tokenizer, token_id)
        top = [
            p.TopLogprob(
                token=(t := state.token_text(tokenizer, tid)),
                logprob=finite_logprob(lp),
                bytes=list(t.encode()),
            )
            for tid, lp in top_items(entry, k)
        ]
        content.append(
            p.TokenLogprob(
                token=text,
                logprob=finite_logprob(entry[token_id]),
                bytes=list(text.encode()),
                top_logprobs=top,
            )
        )
    return p.ChoiceLogprobs(content=content)


def _tool_call(call: ToolCall) -> p.ToolCall:
    return p.ToolCall(id=call.id, function=p.FunctionCall(name=call.name, arguments=call.arguments))


class ChatCompletions:
    """Turns a validated chat request into engine work and the engine's outputs into OpenAI responses."""

    def __init__(self, state: ServerState):
        self.state = state

    async def create(self, body: p.ChatCompletionRequest, request: Request) -> Response:
        state = self.state
        state.check_model(body.model)
        ip = state.require_input()
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be in [0, {MAX_LOGPROBS}]", param="top_logprobs")
        check_prompt_logprobs(body, ip.max_logprobs)
        params = sampling_params(
            body,
            state.config.max_n,
            max_tokens,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            prompt_logprobs=body.prompt_logprobs,
            renamed={"logprobs": "top_logprobs"},
        )
        truncation = state.truncation_policy(body, chat=True)
        slot = lookup(
            state.response_cache, "chat", body, params, state.model_name, truncation, request.headers
        )
        if slot.hit is not None:
            cached, headers = refreshed(slot.hit, "chatcmpl")
            if body.stream:
                return SSEResponse(sse_events(replay_chat(cached, stream_usage(body))), None, headers)
            return JSONResponse(cached, headers=headers)
        if "chat_template" in (body.model_extra or {}):
            # A template is code run on the server; only the model's own is trusted.
            raise InvalidRequest("a request may not supply its own chat_template", param="chat_template")
        messages = _messages(body)
        tools, _ = _tools(body)
        grammar = await compile_grammar(state, ip, body, chat=True)

        def prepare() -> tuple[ChatPrompt, ProcessedRequest]:
            prompt = render_chat(
                ip, messages, tools, state.config.tool_call_parser, ip.prompt_budget(max_tokens), truncation
            )
            return prompt, process_chat(ip, new_id("chatcmpl"), prompt, params, grammar)

        prompt, job = await state.in_thread(prepare)
        lease = state.admit([len(prompt.token_ids)], params.n)
        state.metrics.on_truncated(truncation, prompt.truncated_tokens)
        headers = reply_headers(False, prompt.truncated_tokens)
        if body.stream:
            return SSEResponse(
                sse_events(self._stream(body, request, prompt, job, ip.tokenizer, slot)), lease, headers
            )
        try:
            final = None
            async for _, delta in state.run(request, [job]):
                final = merge_delta(final, delta)
        finally:
            lease.release()
        response = self._response(body, prompt, job, final, ip.tokenizer).model_dump()
        slot.store(response)
        return JSONResponse(response, headers=headers)

    def _response(
        self,
        body: p.ChatCompletionRequest,
        prompt: ChatPrompt,
        job: ProcessedRequest,
        final: RequestOutput,
        tokenizer: Tokenizer,
    ) -> p.ChatCompletionResponse:
        choices = []
        for c in final.outputs:
            content, calls = c.text, []
            if prompt.parser is not None:
                content, calls = parse_tool_calls(content, prompt.tool_names, prompt.parser)
            message = p.AssistantMessage(
                content=None if calls and not content.strip() else content,
                tool_calls=[_tool_call(call) for call in calls] or None,
            )
            choices.append(
                p.ChatChoice(
                    index=c.index,
                    message=message,
                    logprobs=chat_logprobs(self.state, tokenizer, c, body.top_logprobs or 0)
                    if body.logprobs
                    else None,
                    finish_reason="tool_calls" if calls else c.finish_reason,
                )
            )
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        prompt_logprobs = None
        if body.prompt_logprobs is not None:
            prompt_logprobs = prompt_logprobs_json(
                self.state, tokenizer, job.prompt_token_ids, final.prompt_logprobs or [], body.prompt_logprobs
            )
        return p.ChatCompletionResponse(
            id=job.request_id,
            created=int(time.time()),
            model=self.state.model_name,
            choices=choices,
            usage=usage(
                len(job.prompt_token_ids),
                completion_tokens,
                final.num_cached_tokens,
                prompt.truncated_tokens,
                prompt.dropped_messages,
            ),
            prompt_logprobs=prompt_logprobs,
        )

    async def _stream(
        self,
        body: p.ChatCompletionRequest,
        request: Request,
        prompt: ChatPrompt,
        job: ProcessedRequest,
        tokenizer: Tokenizer,
        slot: CacheSlot | None = None,
    ) -> AsyncIterator[p.ChatCompletionChunk]:
        state = self.state
        slot = slot or CacheSlot()
        created = int(time.time())

        def chunk(index: int, delta: p.DeltaMessage, **kwargs) -> p.ChatCompletionChunk:
            choice = p.ChatStreamChoice(index=index, delta=delta, **kwargs)
            return p.ChatCompletionChunk(
                id=job.request_id, created=created, model=state.model_name, choices=[choice]
            )

        parsers: dict[int, ToolCallStream] = {}
        num_calls: dict[int, int] = {}
        # Whitespace-only content is held while tool calls may come: next to calls it counts as none
        # (parallel hermes calls are separated by a newline), as the non-streamed answer has it.
        held: dict[int, str] = {}
        for k in range(job.params.n):
            yield chunk(k, p.DeltaMessage(role="assistant", content=""))
            if prompt.parser is not None:
                parsers[k] = ToolCallStream(prompt.tool_names, prompt.parser)
            num_calls[k] = 0
            held[k] = ""
        completion_tokens = cached_tokens = 0
        final = None  # the whole answer, for the response cache
        async for _, out in state.run(request, [job]):
            cached_tokens = out.num_cached_tokens
            if slot.active:
                final = merge_delta(final, out)
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                content, calls = c.text, []
                parser = parsers.get(c.index)
                if parser is not None:
                    content, calls = parser.feed(c.text)
                    if c.finished:
                        more_content, more_calls = parser.finish()
                        content, calls = content + more_content, calls + more_calls
                    content, held[c.index] = held[c.index] + content, ""
                    calls_so_far = num_calls[c.index] + len(calls)
                    if content and not content.strip() and (calls_so_far or not c.finished):
                        content, held[c.index] = "", content
                logprobs = (
                    chat_logprobs(state, tokenizer, c, body.top_logprobs or 0)
                    if body.logprobs and c.token_ids
                    else None
                )
                if content or calls or logprobs:
                    deltas = [
                        p.DeltaToolCall(
                            index=num_calls[c.index] + j,
                            id=call.id,
                            type="function",
                            function=p.DeltaFunctionCall(name=call.name, arguments=call.arguments),
                        )
                        for j, call in enumerate(calls)
                    ]
                    num_calls[c.index] += len(calls)
                    delta = p.DeltaMessage(
                        content=content or (None if calls else ""), tool_calls=deltas or None
                    )
                    yield chunk(c.index, delta, logprobs=logprobs)
                if c.finished:
                    reason = "tool_calls" if num_calls[c.index] else c.finish_reason
                    yield chunk(c.index, p.DeltaMessage(), finish_reason=reason)
        # Reached only when every choice finished: a disconnect or an error raised out of the loop.
        if final is not None:
            slot.store(self._response(body, prompt, job, final, tokenizer).model_dump())
        if stream_usage(body):
            yield p.ChatCompletionChunk(
                id=job.request_id,
                created=created,
                model=state.model_name,
                choices=[],
                usage=usage(
                    len(job.prompt_token_ids),
                    completion_tokens,
                    cached_tokens,
                    prompt.truncated_tokens,
                    prompt.dropped_messages,
                ),
            )
