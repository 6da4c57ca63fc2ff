"""Structured output and the other generation fields through a real `loom serve` and the openai SDK:
response_format, vLLM's structured_outputs and guided_* fields, forced tool calls (parsed and validated),
streaming equal to non-streaming, n > 1, the bad-input list (4xx in bounded time, server unharmed),
logit_bias, bad_words and prompt_logprobs.

A random model never closes a string on its own: JSON requests carry a logit_bias of +5 on the tokens
made of closing characters and on EOS (see tests/engine/structured/test_engine_grammar.py).
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from loom.frontend.tool_parsers import parse_tool_calls
from loom.tokenizer import Tokenizer

CHAT = [{"role": "user", "content": "Answer in JSON."}]
CLOSING = set('"}]),@.')
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
        },
    },
}
# Bounded by the HTTP client's timeout: every answer of the bad-input list must come within it.
BOUND_S = 60  # the timeout of Server.http() and Server.openai() (tests/conftest.py)


@pytest.fixture(scope="module")
def bias(tiny_llama_dir) -> dict[str, float]:
    tok = Tokenizer(tiny_llama_dir)
    ids = [
        t for t in range(tok.vocab_size) if set(tok.decode([t], skip_special_tokens=False) or "x") <= CLOSING
    ]
    return {str(t): 5.0 for t in [*ids, *tok.eos_token_ids]}


def _chat(server, **kwargs):
    return server.openai().chat.completions.create(model=server.model, messages=CHAT, **kwargs)


def test_json_schema_chat_streamed_or_not_and_n2(server, bias):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    plain = _chat(server, max_tokens=120, temperature=0, response_format=fmt, logit_bias=bias)
    text = plain.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert plain.choices[0].finish_reason == "stop"
    stream = _chat(server, max_tokens=120, temperature=0, response_format=fmt, logit_bias=bias, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    sampled = _chat(
        server, max_tokens=120, temperature=1.0, seed=5, n=3, response_format=fmt, logit_bias=bias
    )
    assert len(sampled.choices) == 3
    for choice in sampled.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_and_structured_outputs_on_chat(server, bias):
    any_object = _chat(
        server, max_tokens=150, temperature=0, response_format={"type": "json_object"}, logit_bias=bias
    )
    assert isinstance(json.loads(any_object.choices[0].message.content), dict)
    choice = _chat(
        server, max_tokens=10, temperature=1.0, extra_body={"structured_outputs": {"choice": ["up", "down"]}}
    )
    assert choice.choices[0].message.content in ("up", "down")


@pytest.mark.parametrize(
    "field, value, check",
    [
        ("guided_json", PERSON, lambda t: jsonschema.validate(json.loads(t), PERSON)),
        (
            "guided_regex",
            r"[A-Z]{2}-[0-9]{3}",
            lambda t: re.fullmatch(r"[A-Z]{2}-[0-9]{3}", t) or pytest.fail(t),
        ),
        (
            "guided_choice",
            ["alpha", "beta", "gamma"],
            lambda t: t in ("alpha", "beta", "gamma") or pytest.fail(t),
        ),
        (
            "guided_grammar",
            'start: "go " DIR\nDIR: "north" | "south"',
            lambda t: t in ("go north", "go south") or pytest.fail(t),
        ),
        (
            "structured_outputs",
            {"regex": "[0-9]{1,4} apples"},
            lambda t: re.fullmatch("[0-9]{1,4} apples", t) or pytest.fail(t),
        ),
    ],
)
def test_completions_honour_every_structured_field(server, bias, field, value, check):
    client = server.openai()
    body = {field: value, "logit_bias": bias}
    plain = client.completions.create(
        model=server.model, prompt="Q:", max_tokens=120, temperature=0, extra_body=body
    )
    check(plain.choices[0].text)
    stream = client.completions.create(
        model=server.model, prompt="Q:", max_tokens=120, temperature=0, extra_body=body, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == plain.choices[0].text
    several = client.completions.create(
        model=server.model, prompt=["Q:", "A:"], n=2, max_tokens=120, temperature=1.0, seed=3, extra_body=body
    )
    assert len(several.choices) == 4
    for c in several.choices:
        check(c.text)


def _validate_call(call, tools) -> None:
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_time"}}],
)
def test_forced_tool_calls_parse_and_validate(server, bias, tool_choice):
    tools = [WEATHER, TIME]
    for temperature in (0.0, 1.0):
        resp = _chat(
            server, tools=tools, tool_choice=tool_choice, max_tokens=200, temperature=temperature, seed=1, n=2,
            logit_bias=bias,
        )  # fmt: skip
        for choice in resp.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            assert choice.message.tool_calls
            for call in choice.message.tool_calls:
                if isinstance(tool_choice, dict):
                    assert call.function.name == "get_time"
                _validate_call(call, tools)
    streamed = _chat(
        server,
        tools=tools,
        tool_choice=tool_choice,
        max_tokens=200,
        temperature=0,
        logit_bias=bias,
        stream=True,
    )
    pieces, reasons, content = {}, [], ""
    for chunk in streamed:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or ():
                pieces.setdefault(tc.index, [tc.function.name, ""])[1] += tc.function.arguments or ""
            reasons += [c.finish_reason] if c.finish_reason else []
    greedy = _chat(
        server, tools=tools, tool_choice=tool_choice, max_tokens=200, temperature=0, logit_bias=bias
    )
    calls = greedy.choices[0].message.tool_calls
    assert reasons == ["tool_calls"] and not content.strip()
    assert [[c.function.name, c.function.arguments] for c in calls] == [pieces[i] for i in sorted(pieces)]


def test_parallel_tool_calls_false_gives_one_call(server, bias):
    resp = _chat(
        server, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, max_tokens=200,
        temperature=1.0, seed=2, n=4, logit_bias=bias,
    )  # fmt: skip
    assert all(len(c.message.tool_calls) == 1 for c in resp.choices)


def test_forced_calls_in_the_glm4_format_parse_back(tiny_llama_dir):
    """The GLM-4 form (`name\\n{arguments}`) the grammar writes is what the glm4 parser reads."""
    from loom.engine.structured import GrammarCompiler, tool_call_spec

    tok = Tokenizer(tiny_llama_dir)
    compiler = GrammarCompiler(tok)
    spec = tool_call_spec([WEATHER, TIME], "required", tool_format="glm4")
    matcher = compiler.compile(spec).matcher()
    text = 'get_time\n{"zone": -3}'
    assert matcher.accept_tokens(tok.encode(text, add_special_tokens=False)) == len(
        tok.encode(text, add_special_tokens=False)
    )
    content, calls = parse_tool_calls(text, {"get_weather", "get_time"}, "glm4")
    assert content == "" and calls[0].name == "get_time" and json.loads(calls[0].arguments) == {"zone": -3}
    compiler.close()


# ---- the bad-input list ---------------------------------------------------------------------------


def _deep_schema(levels: int) -> str:
    """A schema of arrays nested `levels` deep, as JSON text (built as text: json.dumps would recurse)."""
    return '{"type": "array", "items": ' * levels + '{"type": "integer"}' + "}" * levels


BAD_INPUTS = [
    ("invalid JSON schema", {"guided_json": {"type": "object", "properties": {"a": {"type": "nope"}}}}, "guided_json"),
    (
        "unsupported keyword in strict mode",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {"type": "array", "uniqueItems": True}}}},
        "response_format",
    ),
    ("Lark grammar that does not parse", {"guided_grammar": "start: (((("}, "guided_grammar"),
    ("tool_choice naming an absent function", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("schema as response_format and guided_json", {"response_format": {"type": "json_object"}, "guided_json": PERSON}, "guided_json"),
    ("unknown response_format type", {"response_format": {"type": "xml"}}, "response_format"),
    ("logit_bias key that is no token id", {"logit_bias": {"hello": 1}}, "logit_bias"),
    ("logit_bias token outside the vocabulary", {"logit_bias": {"999999": 1}}, "logit_bias"),
    ("logit_bias out of range", {"logit_bias": {"5": 500}}, "logit_bias"),
    ("prompt_logprobs with stream", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("unknown guided_decoding_backend", {"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend"),
]  # fmt: skip


@pytest.mark.parametrize("what, fields, param", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_400_naming_the_field(server, what, fields, param):
    body = {"model": server.model, "messages": CHAT, "max_tokens": 8, **fields}
    with server.http() as http:
        resp = http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 400, (what, resp.text)
        assert resp.json()["error"]["param"] == param, (what, resp.text)
        assert http.get("/health").status_code == 200
        ok = http.post(
            "/v1/chat/completions", json={"model": server.model, "messages": CHAT, "max_tokens": 2}
        )
        assert ok.status_code == 200  # the server is unharmed


def test_a_schema_10000_levels_deep_is_a_400(limited_server):
    """As JSON text in guided_json, and nested in the body itself (on a server with the default 4 MiB body
    limit: the schema is 340 kB)."""
    with limited_server.http() as http:
        for body in (
            '{"prompt": "x", "max_tokens": 2, "guided_json": ' + json.dumps(_deep_schema(10_000)) + "}",
            '{"prompt": "x", "max_tokens": 2, "guided_json": ' + _deep_schema(10_000) + "}",
        ):
            resp = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["param"] in ("guided_json", None), resp.text
            assert http.get("/health").status_code == 200
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_catastrophic_regexes_are_accepted_and_harmless(server):
    client = server.openai()
    for pattern, full in ((r"(a+)+$", r"a+"), (r"(a|aa)*b", r"(a|aa)*b")):
        resp = client.completions.create(
            model=server.model, prompt="x", max_tokens=40, temperature=1.0, seed=1,
            extra_body={"guided_regex": pattern}, timeout=BOUND_S,
        )  # fmt: skip
        text = resp.choices[0].text
        assert re.fullmatch(full, text) or (
            resp.choices[0].finish_reason == "length" and re.fullmatch("a*", text)
        )


def test_choice_limit_and_compile_time_bound(limited_server):
    """On a server with --grammar-compile-timeout-s 0.05 (and the default 4 MiB body limit)."""
    with limited_server.http() as http:
        many = [f"option number {i}" for i in range(100_000)]
        resp = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "guided_choice": many})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "guided_choice"
        assert "10000" in resp.json()["error"]["message"]
        slow = [f"{i} " + "word " * 20 for i in range(9_000)]  # compiles in well over 50 ms
        resp = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "guided_choice": slow})
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "guided_choice" and "did not compile within" in error["message"]
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


# ---- logit_bias, bad_words, prompt_logprobs --------------------------------------------------------


def test_logit_bias_steers_greedy_sampling(server):
    client = server.openai()
    with server.http() as http:
        token = http.post("/tokenize", json={"prompt": " river", "add_special_tokens": False}).json()[
            "tokens"
        ][-1]
    resp = client.completions.create(
        model=server.model, prompt="The", max_tokens=4, temperature=0, logit_bias={str(token): 100},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert resp.choices[0].text == " river" * 4
    base = client.completions.create(
        model=server.model, prompt="The", max_tokens=1, temperature=0, logprobs=1
    )
    first = base.choices[0].logprobs.tokens[0]
    with server.http() as http:
        first_id = http.post("/tokenize", json={"prompt": first, "add_special_tokens": False}).json()[
            "tokens"
        ]
    banned = client.completions.create(
        model=server.model, prompt="The", max_tokens=1, temperature=0, logit_bias={str(first_id[0]): -100}
    )
    assert banned.choices[0].text != first


def test_bad_words_are_not_generated(server):
    client = server.openai()
    base = client.completions.create(model=server.model, prompt="The", max_tokens=1, temperature=0)
    word = base.choices[0].text.strip()
    assert word
    resp = client.completions.create(
        model=server.model, prompt="The", max_tokens=1, temperature=0, extra_body={"bad_words": [word]}
    )
    assert resp.choices[0].text.strip() != word


def test_prompt_logprobs_on_chat_and_completions(server):
    with server.http() as http:
        body = {"model": server.model, "prompt": "The river ran low", "max_tokens": 1, "prompt_logprobs": 2}
        resp = http.post("/v1/completions", json=body).json()
        prompt_ids = http.post("/tokenize", json={"prompt": "The river ran low"}).json()["tokens"]
        (choice,) = resp["choices"]
        lps = choice["prompt_logprobs"]
        assert len(lps) == len(prompt_ids) and lps[0] is None
        for token_id, entry in zip(prompt_ids[1:], lps[1:], strict=True):
            assert str(token_id) in entry and len(entry) <= 3
            ranks = sorted(e["rank"] for e in entry.values() if e["rank"] is not None)
            assert ranks[:2] == [1, 2]
            assert all(e["logprob"] <= 0 and isinstance(e["decoded_token"], str) for e in entry.values())
        chat = http.post(
            "/v1/chat/completions",
            json={"model": server.model, "messages": CHAT, "max_tokens": 1, "prompt_logprobs": 0},
        ).json()
        assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
        plain = http.post(
            "/v1/completions", json={"model": server.model, "prompt": "x", "max_tokens": 1}
        ).json()
        assert "prompt_logprobs" not in plain["choices"][0]


# ---- tokenizer routes -------------------------------------------------------------------------------


def test_tokenize_detokenize_tokenizer_info_and_version(server):
    with server.http() as http:
        tokens = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
        assert (
            tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"])
            and tokens["max_model_len"] > 0
        )
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
        assert text.endswith("Hello world")
        chat = http.post("/tokenize", json={"messages": CHAT}).json()
        usage = server.openai().chat.completions.create(model=server.model, messages=CHAT, max_tokens=1).usage
        assert chat["count"] == usage.prompt_tokens  # what chat completions would run
        info = http.get("/tokenizer_info").json()
        assert info["eos_token"] and "<|im_start|>" in info["chat_template"] and info["vocab_size"] == 2048
        assert http.get("/version").json()["version"]
        bad = http.post("/detokenize", json={"tokens": [1, 10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        assert http.post("/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
        assert http.post("/tokenize", json={}).status_code == 400
    assert httpx.get(server.url + "/tokenizer_info").status_code == 401  # behind the API key like the rest


def test_lm_eval_remote_tokenizer_protocol(server):
    """The calls lm-evaluation-harness's local-completions makes to find and use the tokenizer
    (lm_eval.utils.check_remote_tokenizer_support and RemoteTokenizer), against the base URL it is given."""
    base = (server.url + "/v1/completions").replace("/v1/completions", "")
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
    info = httpx.get(f"{base}/tokenizer_info", headers=headers).json()
    assert "eos_token" in info
    encode = httpx.post(
        f"{base}/tokenize", headers=headers, json={"prompt": "test", "add_special_tokens": False}
    )
    tokens = encode.json()["tokens"]
    assert isinstance(tokens, list) and tokens
    eos_id = httpx.post(
        f"{base}/tokenize", headers=headers, json={"prompt": info["eos_token"], "add_special_tokens": False}
    ).json()["tokens"]
    assert len(eos_id) == 1
    assert (
        httpx.post(f"{base}/detokenize", headers=headers, json={"tokens": tokens}).json()["prompt"] == "test"
    )
    # Its loglikelihood request: token ids, echo, one token, logprobs.
    resp = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key).completions.create(
        model=server.model, prompt=tokens + tokens, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    token_logprobs = resp.choices[0].logprobs.token_logprobs
    assert token_logprobs[0] is None and all(lp <= 0 for lp in token_logprobs[1:])
