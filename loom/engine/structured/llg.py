"""GrammarSpec -> llguidance grammar text. The one place that knows llguidance's grammar dialects.

JSON is generated compactly on one line with `", "` and `": "` separators (json.dumps' defaults, which the
chat templates also render) unless the spec allows whitespace. Tool calls become a Lark grammar whose
arguments are inline `%json` schemas, written exactly as loom's tool parsers read them back.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import llguidance

from loom.engine.structured.spec import ANY_OBJECT_SCHEMA, GrammarSpec
from loom.errors import InvalidRequest

# The tags loom's hermes tool parser reads (loom/frontend/tool_parsers.py; the engine does not
# import the server, and the tests parse every generated call with that parser).
HERMES_START = "<tool_call>"
HERMES_END = "</tool_call>"

# llguidance's JSON options: "lenient" ignores keywords it cannot enforce (with a warning) instead of
# failing, which is what a non-strict schema means.
_FIXED_WHITESPACE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_options(strict: bool, whitespace_pattern: str | None) -> dict:
    if whitespace_pattern is None:
        options = dict(_FIXED_WHITESPACE)
    else:
        options = {"whitespace_flexible": True, "whitespace_pattern": whitespace_pattern}
    options["lenient"] = not strict
    return options


def _inline_json(schema_text: str, strict: bool, whitespace_pattern: str | None) -> str:
    """A `%json {...}` body: the schema with our options as defaults under its own x-guidance."""
    schema = json.loads(schema_text)
    schema["x-guidance"] = json_options(strict, whitespace_pattern) | schema.get("x-guidance", {})
    return "%json " + json.dumps(schema, ensure_ascii=False)


def _lark_string(text: str) -> str:
    # llguidance's Lark reads JSON string escapes, so json.dumps quotes any text safely.
    return json.dumps(text, ensure_ascii=False)


def to_llguidance(spec: GrammarSpec, special_token: Callable[[str], str | None]) -> str:
    """The llguidance grammar for spec.

    special_token(text) gives the Lark reference (`<text>`) when the tokenizer has text as one special
    token, or None; tool-call tags are matched as that token when it exists (what the model was trained
    to emit), as text otherwise.
    """
    if spec.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(
            spec.source, defaults=json_options(spec.strict, spec.whitespace_pattern)
        )
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(
            ANY_OBJECT_SCHEMA, defaults=json_options(False, spec.whitespace_pattern)
        )
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        # One terminal of alternatives, not one rule each: the lexer takes 100,000 strings in its trie
        # where as many grammar symbols would overflow the parser's symbol table.
        return llguidance.LLMatcher.grammar_from_lark(
            "start: CHOICE\nCHOICE: " + " | ".join(_lark_string(c) for c in spec.choices) + "\n"
        )
    if spec.kind == "grammar":
        try:
            # Lark passes through; GBNF (llama.cpp's EBNF, what vLLM's xgrammar backend takes) is converted.
            return llguidance.grammar_from("grammar", spec.source)
        except ValueError as e:
            raise InvalidRequest(f"{spec.param} is not a valid grammar: {e}", param=spec.param) from None
    return llguidance.LLMatcher.grammar_from_lark(_tool_calls_lark(spec, special_token))


def _tool_calls_lark(spec: GrammarSpec, special_token: Callable[[str], str | None]) -> str:
    lines = []
    ws = spec.whitespace_pattern
    for i, tool in enumerate(spec.tools):
        lines.append(f"args_{i}: {_inline_json(tool.parameters, tool.strict, ws)}")
    if spec.tool_format == "hermes":
        # As the chat template renders a call: `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`,
        # calls separated by a newline.
        start = special_token(HERMES_START) or _lark_string(HERMES_START)
        end = special_token(HERMES_END) or _lark_string(HERMES_END)
        for i, tool in enumerate(spec.tools):
            head = _lark_string('\n{"name": ' + json.dumps(tool.name) + ', "arguments": ')
            lines.append(f"call_{i}: {start} {head} args_{i} {_lark_string('}' + chr(10))} {end}")
        lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(spec.tools))))
        calls = 'call ("\\n" call)*' if spec.parallel else "call"
    else:
        # GLM-4: the whole output is `name\n{arguments}`, one call (its parser reads no more).
        calls = " | ".join(f'{_lark_string(tool.name)} "\\n" args_{i}' for i, tool in enumerate(spec.tools))
    if spec.source:  # tool_choice auto with a JSON response_format: a reply or calls
        lines.append(f"content: {_inline_json(spec.source, spec.strict, ws)}")
        lines.append(f"start: content | {calls}")
    else:
        lines.append(f"start: {calls}")
    return "\n".join(reversed(lines)) + "\n"
