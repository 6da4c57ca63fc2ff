"""Grammars from every spec kind, walked at random over the tiny tokenizer's vocabulary: every walk that the
grammar lets end yields text that parses and validates (JSON with the jsonschema package, regexes with re,
tool calls with loom's own tool parsers)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from grammar_schemas import SCHEMAS
from grammar_walk import walk, walk_text

from loom.engine.structured import GrammarSpec, request_grammar
from loom.engine.structured.requests import ANY_WHITESPACE
from loom.frontend.tool_parsers import parse_tool_calls

WALKS = 6  # per grammar: even seeds sample from random logits at temperature 1, odd ones uniformly


def _validator(schema: dict) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def test_suite_has_40_schemas():
    assert len(SCHEMAS) >= 40
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_walks_validate(name, compiler, tokenizer, closers):
    schema = SCHEMAS[name]
    # strict: every keyword is enforced (a keyword the grammar could not enforce would fail to compile).
    compiled = compiler.compile(GrammarSpec.json_schema(schema, strict=True, param="response_format"))
    validator = _validator(schema)
    for seed in range(WALKS):
        text = walk_text(compiled, tokenizer, closers, seed, uniform=seed % 2 == 1)
        validator.validate(json.loads(text))


def _whitespace_outside_strings(text: str) -> list[str]:
    """Each run of whitespace outside JSON strings, with the character before it."""
    runs, in_string, escaped, i = [], False, False, 0
    while i < len(text):
        c = text[i]
        if in_string:
            escaped, in_string = (not escaped and c == "\\"), in_string and (escaped or c != '"')
        elif c == '"':
            in_string = True
        elif c.isspace():
            j = i
            while j < len(text) and text[j].isspace():
                j += 1
            runs.append(text[i - 1 : j])
            i = j
            continue
        i += 1
    return runs


def test_json_walks_use_fixed_separators(compiler, tokenizer, closers):
    compiled = compiler.compile(GrammarSpec.json_schema(SCHEMAS["pydantic_like"], param="response_format"))
    for seed in range(WALKS):
        text = walk_text(compiled, tokenizer, closers, seed)
        json.loads(text)
        # One line: a single space after each separator and nowhere else.
        assert set(_whitespace_outside_strings(text)) <= {", ", ": "}, text


def test_json_walks_with_flexible_whitespace_validate(compiler, tokenizer, closers):
    schema = SCHEMAS["array_of_objects"]
    spec = GrammarSpec.json_schema(schema, param="guided_json", whitespace_pattern=ANY_WHITESPACE)
    compiled = compiler.compile(spec)
    runs = []
    for seed in range(WALKS):
        text = walk_text(compiled, tokenizer, closers, seed)
        _validator(schema).validate(json.loads(text))
        runs += _whitespace_outside_strings(text)
    assert any(run[1:] not in ("", " ") for run in runs)  # newlines and tabs do occur


def test_json_object_walks_are_objects(compiler, tokenizer, closers):
    compiled = compiler.compile(GrammarSpec.json_object(param="response_format"))
    for seed in range(WALKS):
        assert isinstance(json.loads(walk_text(compiled, tokenizer, closers, seed)), dict)


def test_walks_never_emit_special_tokens(compiler, tokenizer, closers):
    compiled = compiler.compile(GrammarSpec.json_schema(SCHEMAS["array_of_objects"], param="guided_json"))
    specials = set(tokenizer.hf.all_special_ids)
    for seed in range(WALKS):
        tokens = walk(compiled.matcher(), compiler.vocab_size, closers, seed)
        inner = tokens[:-1] if tokens[-1] in tokenizer.eos_token_ids else tokens
        assert not specials & set(inner)


REGEXES = [
    r"[0-9]{3}-[0-9]{4}",  # Rust's \d is any Unicode digit, newer than Python's tables
    r"[A-Z][a-z]{2,6}( [A-Z][a-z]{2,6})?",
    r"(true|false)",
    r"-?[0-9]+(\.[0-9]{1,2})?",
    r"[^\n]{1,20}\n",
    r"(a|aa)*b",
    r"(a+)+$",
    r"([a-z]+)*[0-9]",
    r"(foo|bar|baz)(,(foo|bar|baz)){0,3}",
    r"[0-9a-f]{8}",
]


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_walks_match(pattern, compiler, tokenizer, closers):
    compiled = compiler.compile(GrammarSpec.regex(pattern, param="guided_regex"))
    for seed in range(WALKS):
        text = walk_text(compiled, tokenizer, closers, seed, uniform=seed % 2 == 1)
        assert re.fullmatch(pattern, text), text


CHOICES = [
    ["yes", "no"],
    ["a", "ab", "abc", "abcd"],  # each a prefix of the next
    ['say "hi"\n', "back\\slash", "tab\there", "naïve 🚀", "<|im_start|>"],
    [f"option {i}" for i in range(300)],
]


@pytest.mark.parametrize("choices", CHOICES, ids=["yes-no", "prefixes", "escapes", "300"])
def test_choice_walks_are_choices(choices, compiler, tokenizer, closers):
    compiled = compiler.compile(GrammarSpec.choice(choices, param="guided_choice"))
    seen = set()
    for seed in range(3 * WALKS):
        text = walk_text(compiled, tokenizer, closers, seed, uniform=seed % 2 == 1)
        assert text in choices
        seen.add(text)
    assert len(seen) > 1  # the walk does explore: a grammar stuck on one choice would fail here


GRAMMARS = {
    "lark": (
        'start: greeting " " name "!"\ngreeting: "hello" | "hi"\nname: /[A-Z][a-z]{1,8}/\n',
        lambda text: re.fullmatch(r"(hello|hi) [A-Z][a-z]{1,8}!", text),
    ),
    "gbnf": (
        'root ::= "yes" | "no" | "maybe " [0-9]',
        lambda text: re.fullmatch(r"yes|no|maybe [0-9]", text),
    ),
    "recursive": ('start: p\np: "(" p* ")"\n', lambda text: _balanced(text)),
}


def _balanced(text: str) -> bool:
    depth = 0
    for i, c in enumerate(text):
        depth += 1 if c == "(" else -1
        if c not in "()" or depth < 0 or (depth == 0 and i != len(text) - 1):
            return False
    return depth == 0


@pytest.mark.parametrize("kind", sorted(GRAMMARS))
def test_grammar_walks_parse(kind, compiler, tokenizer, closers):
    source, check = GRAMMARS[kind]
    compiled = compiler.compile(GrammarSpec.grammar(source, param="guided_grammar"))
    for seed in range(WALKS):
        text = walk_text(compiled, tokenizer, closers, seed, uniform=seed % 2 == 1)
        assert check(text), text


TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": SCHEMAS["weather_tool_args"]},
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},  # no parameters: any JSON object
    {"type": "function", "function": {"name": "plan", "parameters": SCHEMAS["pydantic_like"]}},
]
_SCHEMA_OF = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}


@pytest.mark.parametrize("tool_format", ["hermes", "glm4"])
@pytest.mark.parametrize("choice", ["required", "named"])
@pytest.mark.parametrize("parallel", [True, False])
def test_forced_tool_calls_parse_and_validate(tool_format, choice, parallel, compiler, tokenizer, closers):
    tool_choice = {"type": "function", "function": {"name": "plan"}} if choice == "named" else "required"
    spec = request_grammar(
        tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=parallel, tool_format=tool_format
    )
    compiled = compiler.compile(spec)
    names = {t["function"]["name"] for t in TOOLS}
    counts = set()
    for seed in range(WALKS):
        text = walk_text(compiled, tokenizer, closers, seed, uniform=seed % 2 == 1)
        content, calls = parse_tool_calls(text, names, fmt=tool_format)
        assert calls, text
        assert content.strip() == "", text
        counts.add(len(calls))
        for call in calls:
            assert call.name == "plan" or choice == "required"
            _validator(_SCHEMA_OF[call.name]).validate(json.loads(call.arguments))
    if not parallel or tool_format == "glm4":  # GLM-4's format holds one call
        assert counts == {1}


def test_parallel_hermes_calls_can_be_several(compiler, tokenizer, closers):
    spec = request_grammar(tools=TOOLS[:2], tool_choice="required", parallel_tool_calls=True)
    compiled = compiler.compile(spec)
    counts = [
        len(parse_tool_calls(walk_text(compiled, tokenizer, closers, seed), {"get_weather", "add"})[1])
        for seed in range(4 * WALKS)
    ]
    assert min(counts) >= 1 and max(counts) > 1


@pytest.mark.parametrize("tool_format", ["hermes", "glm4"])
def test_auto_tool_choice_with_json_reply_gives_reply_or_calls(tool_format, compiler, tokenizer, closers):
    reply_schema = SCHEMAS["enum_property"]
    spec = request_grammar(
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": reply_schema}},
        tools=TOOLS[:2],
        tool_choice="auto",
        tool_format=tool_format,
    )
    compiled = compiler.compile(spec)
    kinds = set()
    for seed in range(4 * WALKS):
        text = walk_text(compiled, tokenizer, closers, seed, uniform=seed % 2 == 1)
        content, calls = parse_tool_calls(text, {"get_weather", "add"}, fmt=tool_format)
        if calls:
            kinds.add("calls")
            assert content.strip() == ""
            for call in calls:
                _validator(_SCHEMA_OF[call.name]).validate(json.loads(call.arguments))
        else:
            kinds.add("reply")
            _validator(reply_schema).validate(json.loads(text))
    assert kinds == {"calls", "reply"}
