"""What a request constrains its output to: a typed, library-neutral grammar spec with a stable cache key.

A spec is built at the edge from request fields (see `requests.py`), checked for size and depth there, and
compiled by `GrammarCompiler` against one tokenizer. Its key (sha256 of everything that changes the
compiled grammar) names it in the compile cache; `param` (the request field to blame) is not part of it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from loom.errors import InvalidRequest

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar", "tool_calls"]
KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "tool_calls")
ToolFormat = Literal["hermes", "glm4"]
TOOL_FORMATS = ("hermes", "glm4")

# Any JSON object: what json_object asks for, and a function's arguments when it declares no parameters.
ANY_OBJECT_SCHEMA = '{"type":"object"}'


@dataclass(frozen=True, slots=True)
class SpecLimits:
    """How large a spec the edge accepts before anything is compiled (each bound is an InvalidRequest)."""

    max_depth: int = 64
    """Deepest nesting of objects and arrays in a JSON schema (real schemas stay under ~20 levels; the
    bound keeps recursive serializers and compilers far from Python's and serde's recursion limits)."""
    max_bytes: int = 1 << 20
    """Longest schema, regex or grammar text, in UTF-8 bytes."""
    max_choices: int = 10_000
    """Most strings in a choice. llguidance compiles ~30k choices a second on this 2-core machine, so
    10,000 is ~0.4 s of a compile thread; 100,000 would be seconds and ends in a grammar-size panic."""
    max_tools: int = 128
    """Most functions a tool-call grammar may offer."""


DEFAULT_LIMITS = SpecLimits()


@dataclass(frozen=True, slots=True)
class ToolFunction:
    """One callable function in a tool-call grammar: its arguments must match `parameters`."""

    name: str
    parameters: str
    """The function's JSON schema for its arguments, serialized (compact, key order kept)."""
    strict: bool = False
    """Refuse schema keywords the grammar cannot enforce (OpenAI's function.strict) instead of ignoring them."""


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A constraint on one request's output. Build with the classmethods, which check the limits.

    kind and its fields:
    - json_schema: `source` is the schema (serialized), `strict` refuses keywords that cannot be enforced;
    - json_object: any JSON object;
    - regex: `source` is a regular expression the whole output matches (Rust regex syntax);
    - choice: the output is exactly one of `choices`;
    - grammar: `source` is a Lark grammar (llguidance's dialect) or a GBNF/EBNF grammar;
    - tool_calls: the output is one call (or with `parallel`, one or more) to `tools` in `tool_format`,
      each call's arguments matching that function's schema; when `source` holds a JSON schema, the output
      may instead be a JSON reply matching it (tool_choice auto with a response_format).
    """

    kind: GrammarKind
    source: str = ""
    strict: bool = False
    choices: tuple[str, ...] = ()
    tools: tuple[ToolFunction, ...] = ()
    tool_format: ToolFormat = "hermes"
    parallel: bool = False
    whitespace_pattern: str | None = None
    """JSON only: a regex of the whitespace allowed between tokens; None allows none (fixed ", " and ": "
    separators), which keeps a weak or random model from spending its budget on blank lines."""
    param: str = field(default="", compare=False)
    """The request field this came from, named in errors (not part of the key)."""
    key: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.tool_format not in TOOL_FORMATS:
            raise ValueError(f"tool_format must be one of {TOOL_FORMATS}, got {self.tool_format!r}")
        material = [
            self.kind,
            self.source,
            self.strict,
            list(self.choices),
            [[t.name, t.parameters, t.strict] for t in self.tools],
            self.tool_format,
            self.parallel,
            self.whitespace_pattern,
        ]
        digest = hashlib.sha256(json.dumps(material, ensure_ascii=False).encode()).hexdigest()
        object.__setattr__(self, "key", digest)

    # ---- constructors (each checks the limits and names `param` in its errors) -----------------------

    @classmethod
    def json_schema(
        cls,
        schema: Any,
        *,
        strict: bool = False,
        param: str,
        whitespace_pattern: str | None = None,
        limits: SpecLimits = DEFAULT_LIMITS,
    ) -> GrammarSpec:
        """schema: a dict, or a string holding one (vLLM's guided_json accepts both)."""
        text = schema_text(schema, param, limits)
        return cls("json_schema", text, strict=strict, whitespace_pattern=whitespace_pattern, param=param)

    @classmethod
    def json_object(cls, *, param: str, whitespace_pattern: str | None = None) -> GrammarSpec:
        return cls("json_object", whitespace_pattern=whitespace_pattern, param=param)

    @classmethod
    def regex(cls, pattern: Any, *, param: str, limits: SpecLimits = DEFAULT_LIMITS) -> GrammarSpec:
        return cls("regex", _text(pattern, param, limits, "a regular expression"), param=param)

    @classmethod
    def grammar(cls, text: Any, *, param: str, limits: SpecLimits = DEFAULT_LIMITS) -> GrammarSpec:
        return cls("grammar", _text(text, param, limits, "a Lark or EBNF grammar"), param=param)

    @classmethod
    def choice(cls, choices: Any, *, param: str, limits: SpecLimits = DEFAULT_LIMITS) -> GrammarSpec:
        if not isinstance(choices, list | tuple) or not choices:
            raise InvalidRequest(f"{param} must be a non-empty list of strings", param=param)
        if len(choices) > limits.max_choices:
            raise InvalidRequest(
                f"{param} has {len(choices)} strings; at most {limits.max_choices} are accepted", param=param
            )
        if not all(isinstance(c, str) and c for c in choices):
            raise InvalidRequest(f"{param} must hold non-empty strings only", param=param)
        if sum(len(c.encode()) for c in choices) > limits.max_bytes:
            raise InvalidRequest(f"{param} is longer than {limits.max_bytes} bytes in all", param=param)
        return cls("choice", choices=tuple(dict.fromkeys(choices)), param=param)


def _text(value: Any, param: str, limits: SpecLimits, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{param} must be {what}, as a non-empty string", param=param)
    if len(value.encode()) > limits.max_bytes:
        raise InvalidRequest(f"{param} is longer than {limits.max_bytes} bytes", param=param)
    return value


def schema_text(schema: Any, param: str, limits: SpecLimits = DEFAULT_LIMITS) -> str:
    """A JSON schema (dict or JSON text) serialized compactly with key order kept, after depth and size checks.

    Key order is kept (not sorted) because it is the order in which properties are generated.
    """
    if isinstance(schema, str):
        if len(schema.encode()) > limits.max_bytes:
            raise InvalidRequest(f"{param} is longer than {limits.max_bytes} bytes", param=param)
        try:
            schema = json.loads(schema)
        except RecursionError:
            raise InvalidRequest(f"{param} is nested too deeply", param=param) from None
        except ValueError as e:
            raise InvalidRequest(f"{param} is not valid JSON: {e}", param=param) from None
    if schema is True:  # JSON Schema's "anything" schema
        schema = {}
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param} must be a JSON schema object", param=param)
    if json_depth(schema, stop_at=limits.max_depth) > limits.max_depth:
        raise InvalidRequest(f"{param} is nested more than {limits.max_depth} levels deep", param=param)
    try:
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"{param} is not a JSON schema: {e}", param=param) from None
    if len(text.encode()) > limits.max_bytes:
        raise InvalidRequest(f"{param} is longer than {limits.max_bytes} bytes", param=param)
    return text


def json_depth(value: Any, stop_at: int = 1 << 30) -> int:
    """Nesting depth of dicts and lists in value, walked without recursion; stops counting past stop_at."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > stop_at:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalItems", "additionalProperties", "unevaluatedProperties", "not", "if")
_SCHEMA_VALUES_2 = ("then", "else", "contains", "propertyNames")
_OPEN_KEYS = ("additionalProperties", "unevaluatedProperties", "patternProperties")


def without_additional_properties(schema: dict) -> dict:
    """A copy of schema in which objects that list `properties` allow no others unless they say so.

    vLLM's `disable_additional_properties`: JSON Schema lets an object carry any extra key by default,
    which a model under a grammar may fill with noise. Members of `allOf` are left alone, since closing
    each part would forbid the properties the other parts add. The walk follows schema keywords only,
    so a property that happens to be named "properties" is not mistaken for a schema.
    """
    root = json.loads(json.dumps(schema))
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, in_all_of = stack.pop()
        if not isinstance(node, dict):
            continue
        if "properties" in node and not in_all_of and not any(k in node for k in _OPEN_KEYS):
            node["additionalProperties"] = False
        for key in _SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack.extend((child, False) for child in node[key].values())
        for key in _SCHEMA_LISTS:
            if isinstance(node.get(key), list):
                stack.extend((child, key == "allOf") for child in node[key])
        for key in _SCHEMA_VALUES + _SCHEMA_VALUES_2:
            value = node.get(key)
            stack.extend((child, False) for child in (value if isinstance(value, list) else [value]))
    return root
