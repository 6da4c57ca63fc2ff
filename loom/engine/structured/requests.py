"""Request fields -> one GrammarSpec: OpenAI's response_format and forced tool_choice, vLLM's
structured_outputs and guided_* fields. Pure functions; every refusal is an InvalidRequest naming its field.

What is honoured and what is refused (HTTP 400):
- response_format: text (no constraint), json_object, json_schema (with strict); others refused.
- structured_outputs: json, regex, choice, grammar, json_object (exactly one), whitespace_pattern,
  disable_any_whitespace, disable_additional_properties, disable_fallback (loom never falls back);
  structural_tag and unknown keys refused.
- guided_json, guided_regex, guided_choice, guided_grammar, guided_whitespace_pattern;
  guided_decoding_backend only as "auto", "guidance" or "llguidance" (the one backend loom has).
- tools with tool_choice "required" or a named function: a grammar of calls whose arguments match each
  function's schema (one call, or one or more with parallel_tool_calls), in the hermes or GLM-4 format.
  tool_choice "auto" with a JSON response_format: a reply matching it, or calls.
Two constraints at once (say response_format and guided_json) are refused, never merged or dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from loom.engine.structured.spec import (
    ANY_OBJECT_SCHEMA,
    DEFAULT_LIMITS,
    GrammarSpec,
    SpecLimits,
    ToolFunction,
    schema_text,
    without_additional_properties,
)
from loom.errors import InvalidRequest

GUIDED_FIELDS = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_whitespace_pattern",
    "guided_decoding_backend",
)
BACKENDS = ("auto", "guidance", "llguidance")
# JSON's own whitespace: what vLLM allows between tokens unless disable_any_whitespace is set.
ANY_WHITESPACE = r"[\x20\x0A\x0D\x09]+"
# OpenAI's function names, plus "." (namespaced tools, e.g. from MCP servers).
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_STRUCTURED_OPTIONS = (
    "whitespace_pattern",
    "disable_any_whitespace",
    "disable_additional_properties",
    "disable_fallback",
)


def from_response_format(response_format: Any, limits: SpecLimits = DEFAULT_LIMITS) -> GrammarSpec | None:
    """OpenAI's response_format: None or text -> None; json_object; json_schema (with strict)."""
    param = "response_format"
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InvalidRequest("response_format must be an object with a 'type'", param=param)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_object(param=param)
    if kind == "json_schema":
        body = response_format.get("json_schema")
        if not isinstance(body, Mapping):
            raise InvalidRequest("response_format.json_schema must be an object", param=param)
        strict = body.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequest("response_format.json_schema.strict must be a boolean", param=param)
        if body.get("schema") is None:  # OpenAI's schema is optional: then any JSON object
            return GrammarSpec.json_object(param=param)
        return GrammarSpec.json_schema(body["schema"], strict=bool(strict), param=param, limits=limits)
    raise InvalidRequest(
        f"response_format type {kind!r} is not supported; use text, json_object or json_schema", param=param
    )


def from_structured_outputs(value: Any, limits: SpecLimits = DEFAULT_LIMITS) -> GrammarSpec | None:
    """vLLM's structured_outputs object: exactly one of json, regex, choice, grammar, json_object."""
    param = "structured_outputs"
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidRequest("structured_outputs must be an object", param=param)
    unknown = [k for k in value if k not in _STRUCTURED_KINDS + _STRUCTURED_OPTIONS]
    if unknown:
        raise InvalidRequest(
            f"structured_outputs.{unknown[0]} is not supported (loom takes "
            f"{', '.join(_STRUCTURED_KINDS + _STRUCTURED_OPTIONS)})",
            param=f"{param}.{unknown[0]}",
        )
    given = [k for k in _STRUCTURED_KINDS if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise InvalidRequest(
            f"structured_outputs needs exactly one of {', '.join(_STRUCTURED_KINDS)}, got {given or 'none'}",
            param=param,
        )
    kind = given[0]
    whitespace = _whitespace(
        value.get("whitespace_pattern"), value.get("disable_any_whitespace"), f"{param}.whitespace_pattern"
    )
    closed = bool(value.get("disable_additional_properties"))
    return _spec(kind, value[kind], f"{param}.{kind}", whitespace, closed, limits)


def from_guided_fields(fields: Mapping[str, Any], limits: SpecLimits = DEFAULT_LIMITS) -> GrammarSpec | None:
    """vLLM's older guided_* fields (fields maps each field name to its value; absent or None is unset)."""
    backend = fields.get("guided_decoding_backend")
    if backend not in (None, "") and backend not in BACKENDS:
        raise InvalidRequest(
            f"guided_decoding_backend {backend!r} is not available; loom's structured output runs on "
            f"llguidance ({', '.join(BACKENDS)})",
            param="guided_decoding_backend",
        )
    given = [
        (name, kind)
        for name, kind in (
            ("guided_json", "json"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "grammar"),
        )
        if fields.get(name) is not None
    ]
    if len(given) > 1:
        raise InvalidRequest(
            f"{given[1][0]} conflicts with {given[0][0]}: give one of them", param=given[1][0]
        )
    pattern = fields.get("guided_whitespace_pattern")
    if not given:
        if pattern is not None:
            raise InvalidRequest(
                "guided_whitespace_pattern needs guided_json", param="guided_whitespace_pattern"
            )
        return None
    name, kind = given[0]
    whitespace = _whitespace(pattern, None, "guided_whitespace_pattern")
    return _spec(kind, fields[name], name, whitespace, False, limits)


def tool_call_spec(
    tools: Any,
    tool_choice: Any,
    parallel_tool_calls: bool | None = None,
    tool_format: str = "hermes",
    content: GrammarSpec | None = None,
    limits: SpecLimits = DEFAULT_LIMITS,
) -> GrammarSpec | None:
    """The grammar tools and tool_choice call for, given the reply's own constraint (content), or None.

    tool_format is how the model writes calls ("hermes" or "glm4"): the server's tool-call parser setting.
    """
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    tools = tools or []
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    forced = _forced_name(tool_choice)  # None: not forced; "": any function; else that one
    if forced is not None and not tools:
        raise InvalidRequest("tool_choice requires tools", param="tool_choice")
    if not tools or tool_choice == "none":
        return content
    functions = _functions(tools, limits)
    if forced is None:  # auto
        if content is None:
            return None
        if content.kind not in ("json_schema", "json_object"):
            raise InvalidRequest(
                f"{content.param} cannot be combined with callable tools (tool_choice auto); "
                "use tool_choice none, or a JSON response_format",
                param=content.param,
            )
        source = content.source if content.kind == "json_schema" else ANY_OBJECT_SCHEMA
        strict = content.strict
    else:
        if content is not None:
            raise InvalidRequest(
                f"{content.param} cannot constrain the reply when tool_choice forces a tool call",
                param=content.param,
            )
        if forced:
            functions = [f for f in functions if f.name == forced]
            if not functions:
                raise InvalidRequest(f"tool_choice names an undeclared function {forced!r}", "tool_choice")
        source, strict = "", False
    return GrammarSpec(
        "tool_calls",
        source=source,
        strict=strict,
        tools=tuple(functions),
        tool_format=tool_format,
        parallel=parallel_tool_calls is not False,
        whitespace_pattern=content.whitespace_pattern if content is not None else None,
        param="tool_choice" if forced is not None else content.param,
    )


def request_grammar(
    *,
    response_format: Any = None,
    structured_outputs: Any = None,
    guided: Mapping[str, Any] | None = None,
    tools: Any = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool | None = None,
    tool_format: str = "hermes",
    limits: SpecLimits = DEFAULT_LIMITS,
) -> GrammarSpec | None:
    """The one constraint of a chat or completions request, or None when it has none."""
    candidates = [
        spec
        for spec in (
            from_response_format(response_format, limits),
            from_structured_outputs(structured_outputs, limits),
            from_guided_fields(guided or {}, limits),
        )
        if spec is not None
    ]
    if len(candidates) > 1:
        first, second = candidates[0].param.split(".")[0], candidates[1].param
        raise InvalidRequest(
            f"{second} conflicts with {first}: give one structured-output constraint", param=second
        )
    content = candidates[0] if candidates else None
    return tool_call_spec(tools, tool_choice, parallel_tool_calls, tool_format, content, limits)


# ---- helpers -----------------------------------------------------------------------------------------


def _spec(
    kind: str, value: Any, param: str, whitespace: str | None, closed: bool, limits: SpecLimits
) -> GrammarSpec:
    if kind != "json" and kind != "json_object" and whitespace is not None:
        raise InvalidRequest(f"a whitespace pattern applies to JSON output only, not to {param}", param=param)
    if kind == "json":
        if closed:
            schema = schema_text(value, param, limits)  # checks depth before the copy below recurses
            value = without_additional_properties(json.loads(schema))
        return GrammarSpec.json_schema(value, param=param, whitespace_pattern=whitespace, limits=limits)
    if kind == "json_object":
        return GrammarSpec.json_object(param=param, whitespace_pattern=whitespace)
    if kind == "regex":
        return GrammarSpec.regex(value, param=param, limits=limits)
    if kind == "choice":
        return GrammarSpec.choice(value, param=param, limits=limits)
    return GrammarSpec.grammar(value, param=param, limits=limits)


def _whitespace(pattern: Any, disable_any: Any, param: str) -> str | None:
    if pattern is not None:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidRequest(f"{param} must be a non-empty regular expression", param=param)
        return pattern
    return ANY_WHITESPACE if disable_any is False else None


def _forced_name(tool_choice: Any) -> str | None:
    if tool_choice in ("none", "auto"):
        return None
    if tool_choice == "required":
        return ""
    if isinstance(tool_choice, Mapping) and tool_choice.get("type", "function") == "function":
        function = tool_choice.get("function")
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            return function["name"]
    raise InvalidRequest(
        "tool_choice must be none, auto, required or {'type': 'function', 'function': {'name': ...}}",
        param="tool_choice",
    )


def _functions(tools: list, limits: SpecLimits) -> list[ToolFunction]:
    if len(tools) > limits.max_tools:
        raise InvalidRequest(f"at most {limits.max_tools} tools are accepted, got {len(tools)}", "tools")
    functions: list[ToolFunction] = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if (
            not isinstance(tool, Mapping)
            or tool.get("type", "function") != "function"
            or not isinstance(function, Mapping)
        ):
            raise InvalidRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise InvalidRequest(
                f"tools[{i}].function.name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}",
                "tools",
            )
        if any(f.name == name for f in functions):
            raise InvalidRequest(f"tools declares the function {name!r} twice", "tools")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object"}
        if not isinstance(parameters, Mapping):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        if "type" not in parameters:
            parameters = {"type": "object", **parameters}  # arguments are always a JSON object
        elif parameters["type"] != "object":
            raise InvalidRequest(f"tools[{i}].function.parameters must describe an object", "tools")
        strict = function.get("strict")
        functions.append(ToolFunction(name, schema_text(dict(parameters), "tools", limits), strict is True))
    return functions
