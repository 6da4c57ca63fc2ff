"""Tokenizer wrapper, chat-template rendering, and incremental detokenization with stop strings."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loom.errors import InvalidRequest

logger = logging.getLogger(__name__)

# Tokens before the first unread one that are decoded again as context, so that merges and leading
# spaces at the boundary come out as they would in a full decode (the TGI/vLLM choice).
_CONTEXT_TOKENS = 5
_SURROGATE = re.compile("[\ud800-\udfff]")


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    # Same as HF's filter: Jinja's builtin escapes HTML and ASCII-fies, which changes what the model sees.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class Tokenizer:
    """A local HF tokenizer plus what the engine needs around it: EOS ids and the chat template."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.path = Path(path)
        # Local files only and no remote code: a model directory must not run code or reach the network.
        self.hf = AutoTokenizer.from_pretrained(
            str(self.path), local_files_only=True, trust_remote_code=False
        )
        self.vocab_size: int = len(self.hf)
        self.eos_token_ids: set[int] = _ids(self.hf.eos_token_id)
        for name in ("generation_config.json", "config.json"):
            file = self.path / name
            if file.is_file():
                self.eos_token_ids |= _ids(json.loads(file.read_text()).get("eos_token_id"))
        self.pad_token_id: int | None = self.hf.pad_token_id
        self._templates: dict[str, jinja2.Template] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; special-token strings in it (e.g. from a chat template) map to their ids.

        Text that is not valid Unicode (a lone UTF-16 surrogate, which JSON's escapes can carry) is the
        caller's error: InvalidRequest, not the tokenizer's TypeError."""
        try:
            return self.hf.encode(text, add_special_tokens=add_special_tokens)
        except TypeError:
            if isinstance(text, str) and _SURROGATE.search(text):
                raise InvalidRequest(
                    "the text contains a lone UTF-16 surrogate (not valid Unicode)", param="prompt"
                ) from None
            raise

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids; an incomplete UTF-8 character at the end decodes as U+FFFD."""
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @cached_property
    def _env(self) -> ImmutableSandboxedEnvironment:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        return env

    def _template(self, name: str) -> jinja2.Template:
        if name not in self._templates:
            source = self.hf.chat_template
            if isinstance(source, dict):  # HF's named templates, e.g. {"default": ..., "tool_use": ...}
                source = source.get(name) or source["default"]
            self._templates[name] = self._env.from_string(source)
        return self._templates[name]

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render the model's own chat template to a prompt string (sandboxed, as HF does).

        Raises InvalidRequest when the model has no template or the messages do not render.
        """
        if not self.has_chat_template:
            raise InvalidRequest(
                f"the model at {self.path} has no chat template; use the completions API instead",
                param="messages",
            )
        context = {
            name: getattr(self.hf, name, None)
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        context.update(
            template_kwargs, messages=messages, tools=tools, add_generation_prompt=add_generation_prompt
        )
        try:
            # Template errors (unknown role, raise_exception, sandbox violations) and type errors from
            # malformed messages are the caller's to fix.
            return self._template("tool_use" if tools else "default").render(context)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise InvalidRequest(f"cannot render the chat template: {e}", param="messages") from e


class IncrementalDetokenizer:
    """Turns a growing list of output tokens into final text deltas, applying stop strings.

    Text is decoded over a small sliding window of tokens (prefix_offset..read_offset are context already
    emitted), so each step costs O(window), not O(output). A delta is held back while it ends in an
    incomplete UTF-8 character, and while the text ends with something that could start a stop string.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        # The prompt's last tokens are decode context only; their text is never emitted.
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # Decoded text not yet emitted. Any future stop match starts inside it (the held-back tail is
        # every suffix that could begin one), so stop search never looks at emitted text.
        self._pending = ""
        self._emitted: list[str] = []  # deltas returned so far, joined lazily by `text`
        self.matched_stop: str | None = None
        """The stop string that ended the output, once one has."""

    @property
    def finished(self) -> bool:
        """True once a stop string has matched; later tokens are ignored."""
        return self.matched_stop is not None

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    def step(self, new_token_ids: list[int]) -> tuple[str, str | None]:
        """Add generated tokens; return (newly final text, the stop string if one just matched)."""
        if self.finished:
            return "", None
        self._ids.extend(new_token_ids)
        return self._advance(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """At the end of generation (for a reason other than a stop string), return the held-back text."""
        if self.finished:
            return ""
        return self._advance(self._decode_new(final=True), final=True)[0]

    def _decode_new(self, final: bool) -> str:
        """Text that the tokens after read_offset add; "" while it ends in an incomplete character."""
        decode = self.tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        full_text = decode(self._ids[self._prefix_offset :], self.skip_special_tokens)
        # A byte-level token can end inside a multi-byte character, which decodes as U+FFFD until the
        # next token completes it. Skipped special tokens add no text and also leave the window alone.
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def _advance(self, new_text: str, final: bool) -> tuple[str, str | None]:
        old_len = len(self._pending)
        pending = self._pending + new_text
        end, matched = len(pending), None
        if self.stop:
            # Only a match that ends in the new text is new; it may start up to max_stop_len - 1 before it.
            match = self._find_stop(pending, max(0, old_len - self._max_stop_len + 1))
            if match is not None:
                pos, matched = match
                end = pos + len(matched) if self.include_stop_str_in_output else pos
                self.matched_stop = matched
                pending = pending[:end]
            elif not final:
                end -= self._stop_prefix_len(pending)
        delta, self._pending = pending[:end], pending[end:]
        if delta:
            self._emitted.append(delta)
        return delta, matched

    def _find_stop(self, text: str, start: int) -> tuple[int, str] | None:
        """(position, stop) of the earliest stop string in text[start:]."""
        best: tuple[int, str] | None = None
        for stop in self.stop:
            pos = text.find(stop, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
