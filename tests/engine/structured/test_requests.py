"""Request fields -> GrammarSpec: what each OpenAI and vLLM field becomes, and which are refused (400)."""

from __future__ import annotations

import json

import pytest

from loom.engine.structured import (
    from_guided_fields,
    from_response_format,
    from_structured_outputs,
    request_grammar,
    tool_call_spec,
)
from loom.engine.structured.requests import ANY_WHITESPACE
from loom.errors import InvalidRequest

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "now"}},
]


def _refused(fn, *args, param: str, **kwargs) -> str:
    with pytest.raises(InvalidRequest) as e:
        fn(*args, **kwargs)
    assert e.value.param == param, e.value.message
    return e.value.message


def test_response_format():
    assert from_response_format(None) is None
    assert from_response_format({"type": "text"}) is None
    assert from_response_format({"type": "json_object"}).kind == "json_object"
    spec = from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    assert (spec.kind, json.loads(spec.source), spec.strict, spec.param) == (
        "json_schema",
        SCHEMA,
        False,
        "response_format",
    )
    strict = from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    )
    assert strict.strict and strict.key != spec.key
    assert from_response_format({"type": "json_schema", "json_schema": {"name": "x"}}).kind == "json_object"
    _refused(from_response_format, {"type": "structural_tag"}, param="response_format")
    _refused(from_response_format, "json", param="response_format")
    _refused(
        from_response_format,
        {"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": "yes"}},
        param="response_format",
    )


def test_structured_outputs():
    assert from_structured_outputs({"json": SCHEMA}).param == "structured_outputs.json"
    assert from_structured_outputs({"regex": "[a-z]+"}).kind == "regex"
    assert from_structured_outputs({"choice": ["a", "b"]}).choices == ("a", "b")
    assert from_structured_outputs({"grammar": "start: /x+/"}).kind == "grammar"
    assert from_structured_outputs({"json_object": True}).kind == "json_object"
    assert from_structured_outputs({"json": SCHEMA, "disable_fallback": True}).whitespace_pattern is None
    flexible = from_structured_outputs({"json": SCHEMA, "disable_any_whitespace": False})
    assert flexible.whitespace_pattern == ANY_WHITESPACE
    assert from_structured_outputs({"json": SCHEMA, "whitespace_pattern": " ?"}).whitespace_pattern == " ?"
    closed = from_structured_outputs({"json": SCHEMA, "disable_additional_properties": True})
    assert json.loads(closed.source)["additionalProperties"] is False
    _refused(from_structured_outputs, {"json": SCHEMA, "regex": "x"}, param="structured_outputs")
    _refused(from_structured_outputs, {}, param="structured_outputs")
    _refused(from_structured_outputs, {"structural_tag": "{}"}, param="structured_outputs.structural_tag")
    _refused(
        from_structured_outputs, {"regex": "x", "whitespace_pattern": " "}, param="structured_outputs.regex"
    )


def test_guided_fields():
    assert from_guided_fields({}) is None
    assert from_guided_fields({"guided_json": json.dumps(SCHEMA)}).source == json.dumps(
        SCHEMA, separators=(",", ":")
    )
    assert from_guided_fields({"guided_regex": "[0-9]+"}).param == "guided_regex"
    assert from_guided_fields({"guided_choice": ["x", "y", "x"]}).choices == ("x", "y")  # deduplicated
    assert from_guided_fields({"guided_grammar": 'root ::= "a"'}).kind == "grammar"
    spaced = from_guided_fields({"guided_json": SCHEMA, "guided_whitespace_pattern": "[ ]?"})
    assert spaced.whitespace_pattern == "[ ]?"
    for backend in ("auto", "guidance", "llguidance", None):
        assert from_guided_fields({"guided_regex": "a", "guided_decoding_backend": backend}).kind == "regex"
    _refused(
        from_guided_fields,
        {"guided_regex": "a", "guided_decoding_backend": "xgrammar"},
        param="guided_decoding_backend",
    )
    _refused(from_guided_fields, {"guided_json": SCHEMA, "guided_regex": "a"}, param="guided_regex")
    _refused(from_guided_fields, {"guided_whitespace_pattern": " "}, param="guided_whitespace_pattern")
    _refused(from_guided_fields, {"guided_choice": []}, param="guided_choice")
    _refused(from_guided_fields, {"guided_choice": ["a", 3]}, param="guided_choice")
    _refused(from_guided_fields, {"guided_json": "{not json"}, param="guided_json")
    _refused(from_guided_fields, {"guided_json": [1, 2]}, param="guided_json")
    _refused(from_guided_fields, {"guided_regex": ""}, param="guided_regex")


def test_forced_tool_choice():
    required = tool_call_spec(TOOLS, "required")
    assert (required.kind, [t.name for t in required.tools], required.parallel) == (
        "tool_calls",
        ["get_weather", "now"],
        True,
    )
    assert json.loads(required.tools[1].parameters) == {"type": "object"}  # no parameters: any object
    named = tool_call_spec(
        TOOLS, {"type": "function", "function": {"name": "now"}}, parallel_tool_calls=False
    )
    assert [t.name for t in named.tools] == ["now"] and not named.parallel and named.param == "tool_choice"
    assert tool_call_spec(TOOLS, "required", tool_format="glm4").tool_format == "glm4"
    assert tool_call_spec(TOOLS, "required").key != tool_call_spec(TOOLS, "required", tool_format="glm4").key


def test_unforced_tool_choice():
    assert tool_call_spec(TOOLS, None) is None
    assert tool_call_spec(TOOLS, "auto") is None
    assert tool_call_spec(TOOLS, "none") is None
    assert tool_call_spec(None, None) is None
    content = from_response_format({"type": "json_object"})
    assert tool_call_spec(TOOLS, "none", content=content) is content
    union = tool_call_spec(TOOLS, "auto", content=content)
    assert (
        union.kind == "tool_calls"
        and union.source == '{"type":"object"}'
        and union.param == "response_format"
    )


def test_tool_refusals():
    _refused(tool_call_spec, [], "required", param="tool_choice")
    _refused(tool_call_spec, TOOLS, {"type": "function", "function": {"name": "absent"}}, param="tool_choice")
    _refused(tool_call_spec, TOOLS, "sometimes", param="tool_choice")
    _refused(tool_call_spec, TOOLS, {"type": "allowed_tools"}, param="tool_choice")
    _refused(
        tool_call_spec, [{"type": "function", "function": {"name": "bad name"}}], "required", param="tools"
    )
    _refused(tool_call_spec, TOOLS + TOOLS[:1], "required", param="tools")
    _refused(tool_call_spec, [{"type": "retrieval"}], "required", param="tools")
    array_params = {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
    _refused(tool_call_spec, [array_params], "required", param="tools")
    content = from_response_format({"type": "json_object"})
    _refused(tool_call_spec, TOOLS, "required", content=content, param="response_format")
    regex = from_guided_fields({"guided_regex": "a"})
    _refused(tool_call_spec, TOOLS, "auto", content=regex, param="guided_regex")


def test_parameters_without_type_are_objects():
    spec = tool_call_spec(
        [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {"properties": {}}}}],
        "required",
    )
    assert json.loads(spec.tools[0].parameters) == {"type": "object", "properties": {}}
    assert spec.tools[0].strict


def test_request_grammar_combines_or_refuses():
    assert request_grammar() is None
    assert request_grammar(response_format={"type": "text"}, guided={"guided_regex": "a"}).kind == "regex"
    msg = _refused(
        request_grammar,
        response_format={"type": "json_object"},
        structured_outputs={"regex": "a"},
        param="structured_outputs.regex",
    )
    assert "response_format" in msg
    _refused(
        request_grammar,
        structured_outputs={"regex": "a"},
        guided={"guided_choice": ["a"]},
        param="guided_choice",
    )
    spec = request_grammar(guided={"guided_json": SCHEMA}, tools=TOOLS, tool_choice="auto")
    assert spec.kind == "tool_calls" and json.loads(spec.source) == SCHEMA
