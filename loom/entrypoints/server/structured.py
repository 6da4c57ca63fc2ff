"""Structured output and the other generation fields at the server's edge: request fields -> one compiled
grammar (or a 400 naming the field), and vLLM's prompt_logprobs in its wire form.

The spec is built and checked on a frontend worker thread (a schema may be a megabyte), the compile is
awaited without blocking the event loop and bounded in time (--grammar-compile-timeout-s).
"""

from __future__ import annotations

from typing import Any

from loom.engine.structured import CompiledGrammar, GrammarSpec, request_grammar
from loom.engine.structured.requests import GUIDED_FIELDS
from loom.entrypoints.server import protocol as p
from loom.entrypoints.server.fields import finite_logprob
from loom.entrypoints.server.serving import ServerState
from loom.errors import InvalidRequest
from loom.frontend.input_processor import InputProcessor
from loom.frontend.structured import tool_format
from loom.outputs import TokenLogprobs
from loom.tokenizer import Tokenizer


def _forces_call(tool_choice: Any) -> bool:
    return tool_choice is not None and tool_choice not in ("none", "auto")


def grammar_spec(
    state: ServerState, ip: InputProcessor, body: p.SamplingRequest, chat: bool
) -> GrammarSpec | None:
    """The request's one output constraint, or None (runs on a frontend worker thread)."""
    guided = {name: getattr(body, name) for name in GUIDED_FIELDS}
    tools = tool_choice = parallel = None
    fmt = "hermes"
    if chat:
        body_tools = body.tools or []
        tool_choice = body.tool_choice
        if isinstance(tool_choice, p.NamedToolChoice):
            tool_choice = tool_choice.model_dump()
        parser = state.config.tool_call_parser
        if parser != "none" or _forces_call(tool_choice):
            tools = [t.model_dump(exclude_none=True) for t in body_tools] or None
            if tools and tool_choice != "none":
                fmt = tool_format(ip.tokenizer, parser)
        elif tool_choice is not None and tool_choice != "none" and not body_tools:
            raise InvalidRequest("tool_choice requires tools", param="tool_choice")
        parallel = body.parallel_tool_calls
    return request_grammar(
        response_format=body.response_format,
        structured_outputs=body.structured_outputs,
        guided=guided,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        tool_format=fmt,
    )


async def compile_grammar(
    state: ServerState, ip: InputProcessor, body: p.SamplingRequest, chat: bool
) -> CompiledGrammar | None:
    """The compiled grammar of a request, or None when it constrains nothing."""
    spec = await state.in_thread(lambda: grammar_spec(state, ip, body, chat))
    if spec is None:
        return None
    return await ip.grammars.compile_async(spec)


def check_prompt_logprobs(body: p.SamplingRequest, max_logprobs: int) -> None:
    if body.prompt_logprobs is None:
        return
    if body.stream:
        raise InvalidRequest("prompt_logprobs is not available with stream", param="prompt_logprobs")
    if not 0 <= body.prompt_logprobs <= max_logprobs:
        raise InvalidRequest(f"prompt_logprobs must be in [0, {max_logprobs}]", param="prompt_logprobs")


def prompt_logprobs_json(
    state: ServerState,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    entries: list[TokenLogprobs | None],
    k: int,
) -> p.PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token, {token id: {logprob, rank, decoded_token}} for the prompt
    token and the k most likely ones (None for the first token)."""
    out: p.PromptLogprobs = []
    for i, token_id in enumerate(prompt_ids):
        entry = entries[i] if i < len(entries) else None
        if entry is None:
            out.append(None)
            continue
        # The entry holds the prompt token and the true top k, so its own top k are ranks 1..k.
        top = sorted(entry, key=entry.get, reverse=True)[:k]
        ranks = {t: r for r, t in enumerate(top, start=1)}
        position: dict[str, p.PromptLogprob] = {}
        for t in dict.fromkeys([token_id, *top]):
            position[str(t)] = p.PromptLogprob(
                logprob=finite_logprob(entry[t]),
                rank=ranks.get(t),
                decoded_token=state.token_text(tokenizer, t),
            )
        out.append(position)
    return out
