"""Chat rendering: messages (and tools) through the model's chat template to prompt tokens, fitted to the
context by the truncation policy. (A forced tool call is a grammar on the output, not text added here:
see loom/engine/structured.)"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loom.errors import InvalidRequest
from loom.frontend.input_processor import InputProcessor, ProcessedRequest
from loom.frontend.multimodal import has_image_parts
from loom.frontend.truncation import fit_chat
from loom.multimodal.inputs import ImageInput

if TYPE_CHECKING:
    from loom.engine.structured import CompiledGrammar
    from loom.sampling_params import SamplingParams


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
    images: tuple[ImageInput, ...] = ()
    mrope: tuple[torch.Tensor | None, int] = (None, 0)
    """M-RoPE positions ([3, n]) and delta of a prompt with images."""


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
    images, image_tokens = [], 0
    if has_image_parts(messages):
        if ip.multimodal is None:
            raise InvalidRequest(
                "this model accepts text only; image parts need a vision-language model", param="messages"
            )
        if truncation != "error":
            # Cutting tokens or turns could cut an image in half: prompts with images must fit as sent.
            raise InvalidRequest(
                f"truncation {truncation!r} is not supported for prompts with images", param="truncation"
            )
        messages, images = ip.multimodal.prepare_messages(messages)
        image_tokens = ip.multimodal.extra_tokens(images)
        budget -= image_tokens
    if tools is not None and tool_call_parser != "none":
        prompt.tool_names = {t["function"]["name"] for t in tools}
        prompt.parser = tool_call_parser
    fitted = fit_chat(tokenizer, messages, tools, budget, ip.max_model_len, truncation, image_tokens)
    prompt.token_ids = fitted.prompt_token_ids
    if ip.multimodal is not None:
        ids, prompt.images, positions, delta = ip.multimodal.finalize(prompt.token_ids, images)
        prompt.token_ids, prompt.mrope = ids, (positions, delta)
    prompt.truncated_tokens, prompt.dropped_messages = fitted.truncated_tokens, fitted.dropped_messages
    return prompt


def process_chat(
    ip: InputProcessor,
    request_id: str,
    prompt: ChatPrompt,
    params: SamplingParams,
    grammar: CompiledGrammar | None = None,
) -> ProcessedRequest:
    """A rendered conversation, validated and fanned out for the engine, its images and M-RoPE positions
    with it: the one way the server, `LLM.chat` and the agent runtime hand a chat to the engine."""
    return ip.process(
        request_id,
        prompt.token_ids,
        params,
        param="messages",
        images=prompt.images,
        mrope=prompt.mrope,
        grammar=grammar,
    )
