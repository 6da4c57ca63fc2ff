"""Tools: Python callables with a JSON schema derived from their type hints, and a registry to call them.

Arguments arrive as JSON text (from a model's tool call) or as a dict (from a workflow's tool node).
Either way they are parsed with `json.loads`, checked against the schema, and passed as keyword
arguments: they are data, never evaluated.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from loom.agent.errors import SchemaError, TemplateError, ToolArgumentError, ToolError
from loom.agent.schema import validate
from loom.agent.template import to_text

logger = logging.getLogger(__name__)

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
MAX_RESULT_CHARS = 1 << 20
"""Default bound of a tool result: as large as read_file's largest file."""
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what OpenAI accepts as a function name


def schema_for(annotation: Any) -> dict:
    """The JSON schema of one parameter's type hint (str, int, float, bool, list[X], dict, Literal, X | None)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    if annotation in _SIMPLE:
        return {"type": _SIMPLE[annotation]}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        schema: dict = {"enum": list(args)}
        kinds = {_SIMPLE.get(type(a)) for a in args}
        if len(kinds) == 1 and None not in kinds:
            schema["type"] = kinds.pop()
        return schema
    if origin in (typing.Union, types.UnionType):
        options = [schema_for(a) for a in args]
        if all(set(o) == {"type"} and isinstance(o["type"], str) for o in options):
            return {"type": [o["type"] for o in options]}
        return {"anyOf": options}
    if annotation is list or origin is list:
        return {"type": "array", "items": schema_for(args[0])} if args else {"type": "array"}
    if annotation is dict or origin is dict:
        schema = {"type": "object"}
        if len(args) == 2:
            schema["additionalProperties"] = schema_for(args[1])
        return schema
    raise TypeError(f"no JSON schema for type hint {annotation!r}; use str, int, float, bool, list, dict")


def _docstring(fn: Callable) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a docstring with an optional Google-style Args: block."""
    doc = inspect.getdoc(fn) or ""
    summary, _, rest = doc.partition("\nArgs:\n")
    params: dict[str, str] = {}
    for line in rest.splitlines():
        match = re.match(r"\s+(\w+)(?:\s*\([^)]*\))?:\s*(.+)", line)
        if match:
            params[match.group(1)] = match.group(2).strip()
        elif line and not line[0].isspace():
            break  # the next section (Returns:, Raises:) ends the Args block
    return " ".join(summary.split()), params


def parameters_schema(fn: Callable) -> dict:
    """The JSON schema of a function's keyword arguments (an object with no extra properties)."""
    hints = typing.get_type_hints(fn)
    _, param_docs = _docstring(fn)
    properties: dict[str, dict] = {}
    required: list[str] = []
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"tool {fn.__name__}: parameter {name!r} must be a named (keyword) parameter")
        schema = schema_for(hints.get(name, inspect.Parameter.empty))
        if name in param_docs:
            schema["description"] = param_docs[name]
        properties[name] = schema
        if param.default is inspect.Parameter.empty:
            required.append(name)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def parse_arguments(arguments: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Tool-call arguments as a dict: JSON text is parsed (never evaluated); anything else is refused."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            raise ToolArgumentError(f"arguments are not valid JSON ({e}): {arguments[:200]!r}") from e
    if not isinstance(arguments, Mapping):
        raise ToolArgumentError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    return dict(arguments)


@dataclass(frozen=True)
class Tool:
    """A callable the runtime may call, with the JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any]
    max_result_chars: int = MAX_RESULT_CHARS
    """Longest result (as text or JSON) a call may return; a longer one is a ToolError."""

    def spec(self) -> dict:
        """The OpenAI `tools` entry for this tool."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    async def call(self, arguments: str | Mapping[str, Any] | None) -> Any:
        """Parse and check arguments, then run the tool (sync tools run in a worker thread)."""
        args = parse_arguments(arguments)
        try:
            validate(args, self.parameters)
        except SchemaError as e:
            raise ToolArgumentError(f"tool {self.name!r}: bad arguments: {e}") from e
        try:
            if inspect.iscoroutinefunction(self.fn):
                result = await self.fn(**args)
            else:
                result = await asyncio.to_thread(self.fn, **args)
        except ToolError:
            raise
        except Exception as e:
            raise ToolError(f"tool {self.name!r} failed: {type(e).__name__}: {e}") from e
        self._check_result(result)
        return result

    def _check_result(self, result: Any) -> None:
        """A result must read as text or strict JSON within max_result_chars: it goes into a prompt, a
        record and `loom run`'s output, and none of them may fail on it."""
        try:
            text = to_text(result)
        except TemplateError as e:
            raise ToolError(f"tool {self.name!r} returned a value that is not JSON: {e}") from e
        if len(text) > self.max_result_chars:
            raise ToolError(
                f"tool {self.name!r} returned {len(text)} characters; the limit is {self.max_result_chars}"
            )


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None) -> Any:
    """Make a Tool of a function: `@tool` or `@tool(name=..., description=...)`.

    The schema comes from the type hints; the description from the docstring (its `Args:` lines
    describe the parameters).
    """

    def wrap(f: Callable) -> Tool:
        tool_name = name or f.__name__
        if not _TOOL_NAME.fullmatch(tool_name):
            raise ValueError(f"tool name {tool_name!r} must match {_TOOL_NAME.pattern}")
        summary, _ = _docstring(f)
        return Tool(tool_name, description if description is not None else summary, parameters_schema(f), f)

    return wrap(fn) if fn is not None else wrap


class ToolRegistry:
    """The tools a run may use, by name."""

    def __init__(self, tools: Iterable[Tool | Callable] = ()):
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    def register(self, t: Tool | Callable) -> Tool:
        """Add a Tool (a plain function is wrapped with `tool`); names must be unique."""
        t = t if isinstance(t, Tool) else tool(t)
        if t.name in self._tools:
            raise ValueError(f"a tool named {t.name!r} is already registered")
        self._tools[t.name] = t
        return t

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise ToolError(
                f"unknown tool {name!r} (known: {', '.join(sorted(self._tools)) or 'none'})"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self, names: Iterable[str] | None = None) -> list[dict]:
        """OpenAI `tools` entries for the named tools (all of them by default)."""
        return [self.get(n).spec() for n in (self._tools if names is None else names)]

    async def call(self, name: str, arguments: str | Mapping[str, Any] | None) -> Any:
        """Call a tool by name with JSON (or dict) arguments."""
        logger.debug("tool call %s(%s)", name, arguments)
        return await self.get(name).call(arguments)
