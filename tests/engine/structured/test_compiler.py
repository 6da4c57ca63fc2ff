"""GrammarCompiler: cache, shared in-flight compiles, the time bound, padded vocabularies, and the bad-input
list (each an InvalidRequest naming its field, the compiler still working afterwards)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from grammar_walk import walk_text

from loom.engine.structured import (
    CompilerConfig,
    GrammarCompiler,
    GrammarSpec,
    allocate_bitmask,
    request_grammar,
)
from loom.errors import InvalidRequest


def _schema(i: int) -> GrammarSpec:
    schema = {"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
    return GrammarSpec.json_schema(schema, param="response_format")


def test_cache_hit_returns_the_same_grammar(tokenizer):
    compiler = GrammarCompiler(tokenizer, config=CompilerConfig(cache_size=2))
    try:
        first = compiler.compile(_schema(0))
        assert compiler.compile(_schema(0)) is first
        assert (compiler.hits, compiler.misses) == (1, 1)
        compiler.compile(_schema(1))
        compiler.compile(_schema(0))  # touch 0: 1 is now the least recently used
        compiler.compile(_schema(2))  # evicts 1
        assert compiler.cache_len() == 2
        assert compiler.compile(_schema(0)) is first
        misses = compiler.misses
        compiler.compile(_schema(1))
        assert compiler.misses == misses + 1
    finally:
        compiler.close()


def test_identical_specs_in_flight_compile_once(tokenizer):
    compiler = GrammarCompiler(tokenizer)
    try:
        choices = [f"item number {i}" for i in range(3000)]  # long enough to still be compiling
        futures = [compiler.submit(GrammarSpec.choice(choices, param="guided_choice")) for _ in range(4)]
        grammars = {id(f.result(timeout=60)) for f in futures}
        assert len(grammars) == 1 and compiler.misses == 1
    finally:
        compiler.close()


def test_compile_past_the_time_bound_is_refused_then_cached(tokenizer, closers):
    compiler = GrammarCompiler(tokenizer, config=CompilerConfig(compile_timeout_s=1e-6))
    try:
        spec = GrammarSpec.choice([f"choice {i}" for i in range(10_000)], param="guided_choice")
        with pytest.raises(InvalidRequest, match="did not compile within") as e:
            compiler.compile(spec)
        assert e.value.param == "guided_choice"
        compiler.submit(spec).result(timeout=120)  # the compile ran on in the background
        assert walk_text(compiler.compile(spec), tokenizer, closers, seed=0).startswith("choice ")
    finally:
        compiler.close()


def test_compile_async(compiler, tokenizer, closers):
    compiled = asyncio.run(compiler.compile_async(GrammarSpec.regex("[0-9]{4}", param="guided_regex")))
    assert len(walk_text(compiled, tokenizer, closers, seed=0)) == 4
    with pytest.raises(InvalidRequest) as e:
        asyncio.run(compiler.compile_async(GrammarSpec.regex("(", param="guided_regex")))
    assert e.value.param == "guided_regex"


def test_padded_vocab_masks_never_allow_padding(tokenizer):
    compiler = GrammarCompiler(tokenizer, vocab_size=tokenizer.vocab_size + 64)
    try:
        matcher = compiler.compile(GrammarSpec.json_object(param="response_format")).matcher()
        bitmask = allocate_bitmask(1, compiler.vocab_size)
        assert bitmask.shape == (1, (tokenizer.vocab_size + 64) // 32)
        matcher.fill_bitmask(bitmask, 0)
        bits = ((bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
        assert bits[: tokenizer.vocab_size].any() and not bits[tokenizer.vocab_size :].any()
    finally:
        compiler.close()
    with pytest.raises(ValueError):
        GrammarCompiler(tokenizer, vocab_size=tokenizer.vocab_size - 1)


def test_errors_are_cached_and_name_each_requests_field(tokenizer):
    compiler = GrammarCompiler(tokenizer)
    try:
        bad = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
        for field in ("response_format", "guided_json", "response_format"):
            with pytest.raises(InvalidRequest, match="missing") as e:
                compiler.compile(GrammarSpec.json_schema(bad, param=field))
            assert e.value.param == field
        assert compiler.misses == 1
    finally:
        compiler.close()


# ---- the bad-input list ------------------------------------------------------------------------------


def _deep_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


BAD_REQUESTS = {
    "invalid_schema": (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "objectx"}},
            }
        },
        "response_format",
    ),
    "schema_10000_deep": ({"guided": {"guided_json": _deep_schema(10_000)}}, "guided_json"),
    "schema_10000_deep_text": (
        {"guided": {"guided_json": '{"items":' * 10_000 + "{}" + "}" * 10_000}},
        "guided_json",
    ),
    "strict_unsupported_keyword": (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "strict": True,
                    "schema": {"type": "array", "uniqueItems": True},
                },
            }
        },
        "response_format",
    ),
    "strict_tool_unsupported_keyword": (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "strict": True,
                        "parameters": {"type": "object", "not": {"required": ["a"]}},
                    },
                }
            ],
            "tool_choice": "required",
        },
        "tool_choice",
    ),
    "bad_regex": ({"guided": {"guided_regex": "(ab"}}, "guided_regex"),
    "lark_does_not_parse": ({"guided": {"guided_grammar": "start: foo (\n"}}, "guided_grammar"),
    "lark_undefined_rule": ({"guided": {"guided_grammar": "start: missing_rule\n"}}, "guided_grammar"),
    "choice_100000": ({"guided": {"guided_choice": [f"c{i}" for i in range(100_000)]}}, "guided_choice"),
    "absent_function": (
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        "tool_choice",
    ),
    "schema_twice": (
        {
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
            "guided": {"guided_json": {"type": "object"}},
        },
        "guided_json",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_an_invalid_request_naming_the_field(case, compiler, tokenizer, closers):
    fields, param = BAD_REQUESTS[case]
    with pytest.raises(InvalidRequest) as e:
        compiler.compile(request_grammar(**fields))  # conversion or compile, whichever finds it
    assert e.value.param == param, e.value.message
    # and the compiler is unharmed
    good = compiler.compile(GrammarSpec.json_object(param="response_format"))
    assert isinstance(json.loads(walk_text(good, tokenizer, closers, seed=0)), dict)


def test_unsupported_keyword_without_strict_is_best_effort(compiler, tokenizer, closers):
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 3}
    compiled = compiler.compile(GrammarSpec.json_schema(schema, param="guided_json"))
    assert isinstance(json.loads(walk_text(compiled, tokenizer, closers, seed=0)), list)


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(a|aa)*b", r"(x+x+)+y", r"(a|b)*a(a|b){24}"])
def test_catastrophic_regexes_are_harmless(pattern, compiler, tokenizer):
    """Backtracking engines take exponential time on these; llguidance's lexer is a lazily built automaton,
    so they compile and run in bounded time, and are accepted (and matched correctly) rather than refused."""
    matcher = compiler.compile(GrammarSpec.regex(pattern, param="guided_regex")).matcher()
    (a,) = tokenizer.encode("a", add_special_tokens=False)
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    accepted = 0
    for _ in range(300):  # the input that makes a backtracking matcher explode: a long run of "a"
        matcher.fill_bitmask(bitmask, 0)
        if not matcher.accept_token(a):
            break
        accepted += 1
    assert matcher.error is None
    assert accepted == (0 if pattern.startswith("(x") else 300)
