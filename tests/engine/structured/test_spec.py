"""GrammarSpec: a stable key over what changes the grammar, size and depth limits, and the rewrite behind
disable_additional_properties."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loom.engine.structured import GrammarSpec, SpecLimits
from loom.engine.structured.spec import json_depth, without_additional_properties
from loom.errors import InvalidRequest

SCHEMA = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}


def test_key_names_what_changes_the_grammar():
    spec = GrammarSpec.json_schema(SCHEMA, param="response_format")
    assert len(spec.key) == 64 and int(spec.key, 16) >= 0
    assert GrammarSpec.json_schema(json.dumps(SCHEMA), param="guided_json").key == spec.key  # not the field
    reordered = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    assert GrammarSpec.json_schema(reordered, param="x").key != spec.key  # property order is output order
    assert GrammarSpec.json_schema(SCHEMA, strict=True, param="x").key != spec.key
    assert GrammarSpec.json_schema(SCHEMA, whitespace_pattern=" ", param="x").key != spec.key
    assert GrammarSpec.regex("a", param="x").key != GrammarSpec.grammar("a", param="x").key


def test_key_is_stable_across_processes():
    code = (
        "from loom.engine.structured import GrammarSpec;"
        f"print(GrammarSpec.json_schema({SCHEMA!r}, param='p').key)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == GrammarSpec.json_schema(SCHEMA, param="q").key


def test_limits():
    limits = SpecLimits(max_depth=3, max_bytes=100, max_choices=2)
    GrammarSpec.json_schema({"a": {"b": {}}}, param="p", limits=limits)
    with pytest.raises(InvalidRequest, match="more than 3 levels") as e:
        GrammarSpec.json_schema({"a": {"b": {"c": {}}}}, param="guided_json", limits=limits)
    assert e.value.param == "guided_json"
    with pytest.raises(InvalidRequest, match="longer than 100 bytes"):
        GrammarSpec.json_schema({"description": "x" * 100}, param="p", limits=limits)
    with pytest.raises(InvalidRequest, match="longer than 100 bytes"):
        GrammarSpec.regex("x" * 101, param="p", limits=limits)
    with pytest.raises(InvalidRequest, match="3 strings; at most 2"):
        GrammarSpec.choice(["a", "b", "c"], param="p", limits=limits)
    with pytest.raises(InvalidRequest):
        GrammarSpec.json_schema(False, param="p")
    assert GrammarSpec.json_schema(True, param="p").source == "{}"


def test_json_depth_walks_without_recursion():
    deep: dict = {}
    for _ in range(50_000):
        deep = {"items": deep}
    assert json_depth(deep, stop_at=10) == 11
    assert json_depth(deep) == 50_001
    assert json_depth([1, [2, [3]], {"a": []}]) == 3


def test_without_additional_properties():
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},  # a property so named
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
            "items": {"type": "array", "items": {"type": "object", "properties": {"y": {}}}},
        },
        "$defs": {"d": {"properties": {"z": {}}}},
        "allOf": [{"properties": {"p": {}}}],
    }
    closed = without_additional_properties(schema)
    assert closed["additionalProperties"] is False
    assert set(closed["properties"]) == {"properties", "open", "items"}  # no key added to the map itself
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["properties"]["items"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["allOf"][0]  # closing a part would forbid the others'
    assert "additionalProperties" not in schema  # the input is not modified
