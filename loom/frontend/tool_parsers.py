"""Reading tool calls out of model text: hermes `<tool_call>{json}</tool_call>` and GLM-4 `name\\n{json}`.

One incremental parser serves both the streaming and the non-streaming path (the latter feeds the whole
text at once), so the two always agree. Arguments are parsed with json.loads and never evaluated; a call
whose JSON does not parse stays in the text as plain content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

HERMES_START = "<tool_call>"
HERMES_END = "</tool_call>"


@dataclass
class ToolCall:
    """One parsed call: `arguments` is a JSON object serialized as a string, as OpenAI sends it."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def _arguments_json(value: object) -> str | None:
    """The arguments as a JSON string, or None if they are not a JSON object (or a string holding one)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def parse_hermes_call(body: str) -> ToolCall | None:
    """The call inside one `<tool_call>...</tool_call>` pair: {"name": ..., "arguments": {...}}."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    # Some hermes-tuned models write "parameters" instead of "arguments"; no arguments means none.
    arguments = _arguments_json(obj.get("arguments", obj.get("parameters", {})))
    if arguments is None:
        return None
    return ToolCall(obj["name"], arguments)


def parse_glm4_call(text: str, tool_names: set[str]) -> ToolCall | None:
    """GLM-4's format: the whole output is a function name on its own line, then a JSON object.

    Only declared tool names count: otherwise any reply whose first line is followed by a JSON object
    ("Sure\\n{...}") would turn into a call.
    """
    name, sep, rest = text.strip().partition("\n")
    name = name.strip()
    if not sep or name not in tool_names:
        return None
    try:
        obj = json.loads(rest)
    except ValueError:
        return None
    arguments = _arguments_json(obj)
    return None if arguments is None else ToolCall(name, arguments)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of text that is a proper prefix of tag (a tag that may be arriving)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolCallStream:
    """Incremental tool-call parsing: feed text deltas, get back (content to emit, calls completed).

    Content is emitted as it comes except what may be the start of a call: a partial `<tool_call>` tag
    is held back, a call is held until its closing tag, and (GLM-4) an output that begins with a
    declared tool name and a newline is held to the end.
    """

    def __init__(self, tool_names: set[str], fmt: str = "auto"):
        self.tool_names = tool_names
        self.hermes = fmt in ("auto", "hermes")
        # GLM-4 calls are only recognised at the very start of the output.
        self._glm_undecided = fmt in ("auto", "glm4") and bool(tool_names)
        self._glm = False
        self._in_call = False
        self._buffer = ""
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._buffer += delta
        if self._glm_undecided and not self._decide_glm():
            return "", []
        if self._glm:
            return "", []
        return self._scan(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """End of output: parse what was held back; whatever is not a valid call is content."""
        if self._glm or self._glm_undecided:
            self._glm = self._glm_undecided = False
            call = parse_glm4_call(self._buffer, self.tool_names)
            if call is not None:
                self._buffer = ""
                self.calls.append(call)
                return "", [call]
        return self._scan(final=True)

    def _decide_glm(self) -> bool:
        """Whether GLM-4 detection is settled; holds text while it may still be `name\\n`."""
        head = self._buffer.lstrip()
        line, newline, _ = head.partition("\n")
        if newline:
            self._glm = line.strip() in self.tool_names
        elif not head or any(name.startswith(line.rstrip()) for name in self.tool_names):
            return False
        self._glm_undecided = False
        return True

    def _scan(self, final: bool) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._in_call:
                end = self._buffer.find(HERMES_END)
                if end == -1 and not final:
                    break
                body = self._buffer if end == -1 else self._buffer[:end]
                rest = "" if end == -1 else self._buffer[end + len(HERMES_END) :]
                call = parse_hermes_call(body)
                if call is None:  # not a call after all: the tags and text go out as they came
                    content.append(HERMES_START + self._buffer[: len(self._buffer) - len(rest)])
                else:
                    calls.append(call)
                self._buffer, self._in_call = rest, False
                if end == -1:
                    break
                continue
            start = self._buffer.find(HERMES_START) if self.hermes else -1
            if start == -1:
                keep = 0 if final or not self.hermes else _partial_suffix(self._buffer, HERMES_START)
                content.append(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                break
            content.append(self._buffer[:start])
            self._buffer, self._in_call = self._buffer[start + len(HERMES_START) :], True
        self.calls.extend(calls)
        return "".join(content), calls


def parse_tool_calls(text: str, tool_names: set[str], fmt: str = "auto") -> tuple[str, list[ToolCall]]:
    """(content, calls) of a finished output; content keeps everything that is not a valid call."""
    stream = ToolCallStream(tool_names, fmt)
    content, calls = stream.feed(text)
    more_content, more_calls = stream.finish()
    return content + more_content, calls + more_calls
