"""Tools: schemas from type hints, arguments parsed as JSON and checked (never evaluated), the built-in
calculator and the read_file sandbox."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
from typing import Literal

import pytest

from loom.agent.builtin_tools import CalculatorError, builtin_tools, calculate, make_read_file
from loom.agent.errors import SchemaError, ToolArgumentError, ToolError
from loom.agent.schema import validate
from loom.agent.template import to_text
from loom.agent.tools import ToolRegistry, tool


@tool
def search(
    query: str, limit: int = 5, mode: Literal["fast", "deep"] = "fast", tags: list[str] | None = None
) -> list:
    """Search the notes.

    Args:
        query: what to look for.
        limit: most results.
    """
    return [query, limit, mode, tags]


def test_schema_comes_from_type_hints_and_docstring():
    assert search.description == "Search the notes."
    assert search.parameters == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "what to look for."},
            "limit": {"type": "integer", "description": "most results."},
            "mode": {"enum": ["fast", "deep"], "type": "string"},
            "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
        },
        "required": ["query"],
        "additionalProperties": False,
    }
    assert search.spec()["function"]["name"] == "search"


def test_arguments_are_parsed_and_checked_never_evaluated(tmp_path):
    registry = ToolRegistry([search])
    call = registry.call
    assert asyncio.run(call("search", '{"query": "x", "limit": 2}')) == ["x", 2, "fast", None]
    assert asyncio.run(call("search", {"query": "y", "tags": ["a"]})) == ["y", 5, "fast", ["a"]]
    marker = tmp_path / "pwned"
    attack = f"__import__('os').system('touch {marker}')"
    with pytest.raises(ToolArgumentError, match="not valid JSON"):
        asyncio.run(call("search", attack))
    # As a JSON string it is just text: not an object of arguments.
    with pytest.raises(ToolArgumentError, match="must be a JSON object"):
        asyncio.run(call("search", f'"{attack}"'))
    # As a value it stays a string; a tool that gets it treats it as data.
    assert asyncio.run(call("search", {"query": attack})) == [attack, 5, "fast", None]
    assert not marker.exists()
    for bad, why in [
        ('{"limit": 2}', "missing required property 'query'"),
        ('{"query": "x", "limit": "2"}', "expected integer"),
        ('{"query": "x", "limit": true}', "expected integer"),
        ('{"query": "x", "mode": "slow"}', "must be one of"),
        ('{"query": "x", "extra": 1}', "unexpected property 'extra'"),
    ]:
        with pytest.raises(ToolArgumentError, match=why):
            asyncio.run(call("search", bad))
    with pytest.raises(ToolError, match="unknown tool 'nope'"):
        asyncio.run(call("nope", "{}"))


def test_schema_validator_subset():
    schema = {
        "type": "object",
        "required": ["steps"],
        "properties": {"steps": {"type": "array", "minItems": 1, "items": {"type": "string"}}},
    }
    validate({"steps": ["a"]}, schema)
    with pytest.raises(SchemaError, match=r"\$\.steps\[1\]: expected string"):
        validate({"steps": ["a", 2]}, schema)
    with pytest.raises(SchemaError, match="at least 1 items"):
        validate({"steps": []}, schema)
    with pytest.raises(SchemaError, match="expected number"):
        validate(True, {"type": "number"})


def test_calculator_does_arithmetic_only():
    assert calculate("(2 + 3) * 4 - 6 / 3") == 18
    assert calculate("2 ** 10") == 1024
    assert calculate("-1.5 + +2") == 0.5
    for refused in [
        "__import__('os').system('echo hi')",
        "open('/etc/passwd').read()",
        "x + 1",
        "[1, 2]",
        "1 if True else 2",
        "True + 1",
        "'a' * 3",
        "(lambda: 1)()",
        "2 // 3",
        "9 ** 9 ** 9",
        "1 / 0",
        "(-8) ** 0.5",
        "1 +",
    ]:
        with pytest.raises(CalculatorError):
            calculate(refused)
    registry = builtin_tools()
    assert asyncio.run(registry.call("calculator", '{"expression": "1 + 2"}')) == 3
    with pytest.raises(ToolError):
        asyncio.run(registry.call("calculator", '{"expression": "__import__(\\"os\\")"}'))


def test_read_file_stays_inside_the_sandbox(tmp_path):
    sandbox = tmp_path / "sandbox"
    (sandbox / "sub").mkdir(parents=True)
    (sandbox / "sub" / "a.txt").write_text("inside")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    os.symlink(secret, sandbox / "link.txt")
    os.symlink(tmp_path, sandbox / "escape")
    read = make_read_file(sandbox)
    assert asyncio.run(read.call({"path": "sub/a.txt"})) == "inside"
    assert asyncio.run(read.call({"path": "sub/../sub/a.txt"})) == "inside"
    assert asyncio.run(read.call({"path": str(sandbox / "sub" / "a.txt")})) == "inside"
    for outside in [
        "../secret.txt",
        "sub/../../secret.txt",
        str(secret),
        "link.txt",
        "escape/secret.txt",
        "/etc/passwd",
    ]:
        with pytest.raises(ToolError, match="outside the sandbox"):
            asyncio.run(read.call({"path": outside}))
    with pytest.raises(ToolError, match="not a file"):
        asyncio.run(read.call({"path": "sub"}))
    assert "read_file" not in builtin_tools()  # no sandbox, no file access
    assert "read_file" in builtin_tools(sandbox)


def test_calculator_results_are_finite_and_printable():
    """1e308*10 used to give inf (written as `Infinity`, not JSON) and 9**23000 an int of 21,947 digits
    (past Python's int-to-str limit: `loom run` died printing it)."""
    for expression, why in [
        ("1e308 * 10", "overflows"),
        ("1e999", "overflows"),
        ("-(1e308 * 10)", "overflows"),
        ("9 ** 23000", "digits"),
        ("(10 ** 3000) * (10 ** 3000)", "digits"),
        ("-" * 200 + "1", "nests deeper"),
    ]:
        with pytest.raises(CalculatorError, match=why):
            calculate(expression)
    biggest = calculate("10 ** 3999")  # the largest integer magnitude the calculator gives: 4,000 digits
    assert json.loads(to_text(biggest)) == biggest and len(to_text(biggest)) == 4000


def test_tool_results_must_be_strict_json_within_the_bound():
    @tool(name="echo")
    def echo(kind: str) -> object:
        """Return a value of the given kind."""
        return {"big": 10**5000, "inf": math.inf, "nan": [math.nan], "set": {1}, "long": "x" * 100}[kind]

    registry = ToolRegistry([echo])
    small = ToolRegistry([dataclasses.replace(echo, max_result_chars=50)])
    for kind, why in [("big", "not JSON"), ("inf", "not JSON"), ("nan", "not JSON"), ("set", "not JSON")]:
        with pytest.raises(ToolError, match=why):
            asyncio.run(registry.call("echo", {"kind": kind}))
    assert asyncio.run(registry.call("echo", {"kind": "long"})) == "x" * 100
    with pytest.raises(ToolError, match="100 characters; the limit is 50"):
        asyncio.run(small.call("echo", {"kind": "long"}))
