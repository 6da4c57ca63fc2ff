"""Chat rendering: messages (and tools) through the model's chat template to prompt tokens, fitted to the
context by the truncation policy. (A forced tool call is a grammar on the output, not text added here:
see loom/engine/structured.)"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from loom.frontend.input_processor import InputProcessor
from loom.frontend.truncation import fit_chat


@dataclass
class ChatPrompt:
    """A rendered conversation and how to read tool calls out of its answer."""

    token_ids: list[int]
    tool_names: set[str] = field(default_factory=set)
    parser: str | None = None
    """Tool-call format to parse ("auto", "hermes", "glm4"), or None when tools are off."""
    truncated_tokens: int = 0
    """Prompt tokens the truncation policy removed."""
    dropped_messages: int = 0


def _num_chars(messages: list[dict], tools: list[dict] | None) -> int:
    """Characters of text a conversation carries: bounds the rendering and tokenizing work before any
    of it is done."""
    total = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return total + (len(json.dumps(tools)) if tools else 0)


def render_chat(
    ip: InputProcessor,
    messages: list[dict],
    tools: list[dict] | None,
    tool_call_parser: str,
    budget: int,
    truncation: str,
) -> ChatPrompt:
    """The conversation as tokens, fitted to `budget` tokens by the truncation policy.

    `tools` are the functions the template shows (None: tools off)."""
    ip.check_chars(_num_chars(messages, tools), "messages")
    tokenizer = ip.tokenizer
    prompt = ChatPrompt(token_ids=[])
    if tools is not None and tool_call_parser != "none":
        prompt.tool_names = {t["function"]["name"] for t in tools}
        prompt.parser = tool_call_parser
    fitted = fit_chat(tokenizer, messages, tools, budget, ip.max_model_len, truncation)
    prompt.token_ids = fitted.prompt_token_ids
    prompt.truncated_tokens, prompt.dropped_messages = fitted.truncated_tokens, fitted.dropped_messages
    return prompt
