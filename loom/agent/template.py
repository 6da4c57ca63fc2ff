"""Safe string templates: `{input.key}`, `{node}`, `{node.field}`, `{node.items.0}`; `{{` and `}}` escape.

Deliberately not `str.format` (whose `{x.__class__}` walks Python attributes) and not Jinja: a reference
is a dotted path of names and list indices, looked up only through dict keys and list positions, so a
template can read data and nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loom.agent.errors import TemplateError

INPUT = "input"
"""The root name under which templates see the workflow's inputs."""

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_REF = re.compile(rf"{_NAME}(?:\.(?:{_NAME}|[0-9]+))*")


@dataclass(frozen=True)
class Ref:
    """One `{a.b.c}` reference: `root` is `input` or a node name, `path` the fields below it."""

    root: str
    path: tuple[str, ...]

    def __str__(self) -> str:
        return "{" + ".".join((self.root, *self.path)) + "}"


def parse(source: str) -> list[str | Ref]:
    """Split a template into literal text and references; raise TemplateError on malformed braces."""
    parts: list[str | Ref] = []
    text: list[str] = []
    i = 0
    while i < len(source):
        c = source[i]
        if c in "{}" and source[i : i + 2] in ("{{", "}}"):
            text.append(c)
            i += 2
        elif c == "}":
            raise TemplateError(f"single '}}' at position {i} in template {source!r} (write '}}}}')")
        elif c == "{":
            end = source.find("}", i)
            body = source[i + 1 : end] if end != -1 else ""
            if end == -1 or not _REF.fullmatch(body):
                shown = source[i : end + 1] if end != -1 else source[i:]
                raise TemplateError(
                    f"bad reference {shown!r} in template {source!r}: use {{input.key}}, {{node}} or "
                    "{node.field} (write '{{' for a literal brace)"
                )
            if text:
                parts.append("".join(text))
                text = []
            root, *path = body.split(".")
            parts.append(Ref(root, tuple(path)))
            i = end + 1
        else:
            text.append(c)
            i += 1
    if text:
        parts.append("".join(text))
    return parts


def references(source: str) -> list[Ref]:
    """The references of a template, in order."""
    return [p for p in parse(source) if isinstance(p, Ref)]


def lookup(ref: Ref, context: Mapping[str, Any]) -> Any:
    """The value a reference names in context ({"input": {...}, node name: output, ...})."""
    if ref.root not in context:
        raise TemplateError(f"{ref} names no input or node output here")
    value = context[ref.root]
    for i, key in enumerate(ref.path):
        where = ".".join((ref.root, *ref.path[:i])) or ref.root
        if isinstance(value, Mapping):
            if key not in value:
                raise TemplateError(f"{ref}: {where} has no field {key!r} (fields: {sorted(value)})")
            value = value[key]
        elif isinstance(value, list) and key.isdigit():
            if int(key) >= len(value):
                raise TemplateError(f"{ref}: {where} has {len(value)} items, no item {key}")
            value = value[int(key)]
        else:
            raise TemplateError(f"{ref}: {where} is a {type(value).__name__}, it has no field {key!r}")
    return value


def to_text(value: Any) -> str:
    """How a value reads inside a prompt: strings as they are, everything else as JSON.

    Strict JSON: NaN and infinities (which json.dumps would write as `NaN` / `Infinity`, valid in no
    JSON parser), ints past Python's int-to-str limit and non-JSON types raise TemplateError.
    """
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise TemplateError(f"a {type(value).__name__} value cannot be written as JSON: {e}") from e


def render(source: str, context: Mapping[str, Any]) -> str:
    """Fill in a template's references from context."""
    return "".join(p if isinstance(p, str) else to_text(lookup(p, context)) for p in parse(source))


def render_value(value: Any, context: Mapping[str, Any]) -> Any:
    """Fill templates inside a JSON-like value (e.g. a tool node's arguments).

    A string that is exactly one reference keeps the referenced value's type (`"{plan.count}"` gives
    an int); other strings are rendered as text; dicts and lists are filled recursively.
    """
    if isinstance(value, str):
        parts = parse(value)
        if len(parts) == 1 and isinstance(parts[0], Ref):
            return lookup(parts[0], context)
        return render(value, context)
    if isinstance(value, dict):
        return {k: render_value(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, context) for v in value]
    return value


def value_references(value: Any) -> list[Ref]:
    """The references inside every template string of a JSON-like value."""
    if isinstance(value, str):
        return references(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in value_references(v)]
    if isinstance(value, list):
        return [r for v in value for r in value_references(v)]
    return []
