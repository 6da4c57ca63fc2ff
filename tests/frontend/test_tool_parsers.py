"""Tool-call parsing (hermes and GLM-4), streaming against one-shot, and the chat handler's assembly of
tool calls into OpenAI responses and stream deltas (crafted engine outputs, no model)."""

from __future__ import annotations

import asyncio
import json

import pytest

from loom.entrypoints.server.chat import ChatCompletions, _messages, _tools
from loom.entrypoints.server.protocol import ChatCompletionRequest
from loom.errors import InvalidRequest
from loom.frontend.chat import ChatPrompt, render_chat
from loom.frontend.input_processor import InputProcessor, ProcessedRequest
from loom.frontend.tool_parsers import ToolCallStream, parse_tool_calls
from loom.outputs import CompletionOutput, RequestOutput
from loom.sampling_params import SamplingParams
from loom.tokenizer import Tokenizer

NAMES = {"get_weather", "search"}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _args(call) -> dict:
    return json.loads(call.arguments)


def test_hermes_single_and_multiple_calls():
    content, calls = parse_tool_calls(CALL, NAMES)
    assert (
        content == "" and [c.name for c in calls] == ["get_weather"] and _args(calls[0]) == {"city": "Paris"}
    )
    assert calls[0].id.startswith("call_")
    text = "Checking. " + CALL + '\n<tool_call>{"name": "search", "parameters": {"q": "rain"}}</tool_call>'
    content, calls = parse_tool_calls(text, NAMES)
    assert content == "Checking. \n"
    assert [(c.name, _args(c)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("search", {"q": "rain"}),
    ]
    assert calls[0].id != calls[1].id


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "f", "arguments": {bad json}}',
        '{"name": "f", "arguments": __import__("os").system("echo pwned")}',  # never evaluated
        '{"arguments": {"x": 1}}',  # no name
        '{"name": "f", "arguments": [1, 2]}',  # arguments must be an object
        "just words",
    ],
)
def test_hermes_invalid_call_stays_content(body):
    text = f"before <tool_call>{body}</tool_call> after"
    assert parse_tool_calls(text, NAMES) == (text, [])


def test_hermes_arguments_as_json_string_and_unclosed_call_at_the_end():
    content, calls = parse_tool_calls(
        '<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}', NAMES
    )
    assert content == "" and _args(calls[0]) == {"q": "x"}  # EOS before </tool_call> still counts
    content, calls = parse_tool_calls('<tool_call>{"name": "search"}</tool_call>', NAMES)
    assert _args(calls[0]) == {}


def test_glm4_format_only_for_declared_tools():
    content, calls = parse_tool_calls('get_weather\n{"city": "Paris"}', NAMES)
    assert content == "" and calls[0].name == "get_weather" and _args(calls[0]) == {"city": "Paris"}
    for text in (
        'Sure\n{"city": "Paris"}',
        'get_weather\n{"city": Paris}',
        "get_weather\nnot json",
        "get_weather",
    ):
        assert parse_tool_calls(text, NAMES) == (text, []), text
    assert parse_tool_calls('get_weather\n{"city": "Paris"}', set()) == ('get_weather\n{"city": "Paris"}', [])
    # Formats can be pinned: hermes ignores GLM-4 output, glm4 ignores <tool_call> tags.
    assert parse_tool_calls('get_weather\n{"a": 1}', NAMES, "hermes")[1] == []
    assert parse_tool_calls(CALL, NAMES, "glm4")[1] == []


SAMPLES = [
    CALL,
    "plain text with a < sign and <tool_ not a tag",
    "Checking. " + CALL + " done",
    'get_weather\n{"city": "Paris"}',
    "get_weather is what I would call",
    'before <tool_call>{"name": "f", bad}</tool_call> after',
    "<tool_call>" + '{"name": "search", "arguments": {}}',
    "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_streaming_char_by_char_equals_one_shot(text):
    stream = ToolCallStream(NAMES)
    content, calls = [], []
    for ch in text:
        c, k = stream.feed(ch)
        content.append(c)
        calls += k
    c, k = stream.finish()
    content.append(c)
    calls += k
    expected_content, expected_calls = parse_tool_calls(text, NAMES)
    assert "".join(content) == expected_content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in expected_calls]


def test_streaming_emits_content_early_and_holds_only_possible_calls():
    stream = ToolCallStream(NAMES)
    assert stream.feed("Hello") == ("Hello", [])  # cannot be a GLM-4 call: out at once
    assert stream.feed(" <tool") == (" ", [])  # a tag may be starting: held
    assert stream.feed("box>") == ("<toolbox>", [])  # it was not
    assert stream.feed('<tool_call>{"name": "search",') == ("", [])
    content, calls = stream.feed(' "arguments": {"q": 1}}</tool_call>!')
    assert content == "!" and calls[0].name == "search"
    glm = ToolCallStream(NAMES)
    assert glm.feed("get_w") == ("", [])  # may be a GLM-4 function name
    assert glm.feed('eather\n{"city": "Rome"}') == ("", [])
    assert [c.name for c in glm.finish()[1]] == ["get_weather"]


# ---- the chat handler's assembly, fed crafted engine outputs ----------------------------------------


class _StubState:
    """Just what ChatCompletions reads: a model name and the engine's delta stream."""

    model_name = "stub"

    def __init__(self, pieces: list[str], finish_reason: str = "stop"):
        self.pieces, self.finish_reason = pieces, finish_reason

    async def run(self, request, jobs):
        for i, piece in enumerate(self.pieces):
            last = i == len(self.pieces) - 1
            c = CompletionOutput(
                0, text=piece, token_ids=[i], finish_reason=self.finish_reason if last else None
            )
            yield 0, RequestOutput("r", None, [1, 2, 3], [c], finished=last)


def _final(text: str) -> RequestOutput:
    return RequestOutput("r", None, [1, 2, 3], [CompletionOutput(0, text, [7, 8], "stop")], finished=True)


BODY = ChatCompletionRequest(messages=[{"role": "user", "content": "weather?"}], stream=True)
JOB = ProcessedRequest("chatcmpl-test", None, [1, 2, 3], SamplingParams(max_tokens=64), [], 0.0)
PROMPT = ChatPrompt([1, 2, 3], tool_names={"get_weather"}, parser="auto")


def _stream(state: _StubState, prompt: ChatPrompt = PROMPT) -> list[dict]:
    async def collect():
        return [c.model_dump() async for c in ChatCompletions(state)._stream(BODY, None, prompt, JOB, None)]

    return asyncio.run(collect())


def test_chat_response_with_tool_calls():
    handler = ChatCompletions(_StubState([]))
    resp = handler._response(BODY, PROMPT, JOB, _final(CALL), None)
    (choice,) = resp.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    plain = handler._response(BODY, PROMPT, JOB, _final("no calls <tool_call>{oops}</tool_call>"), None)
    assert plain.choices[0].message.content == "no calls <tool_call>{oops}</tool_call>"
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "stop"


def test_chat_stream_emits_content_then_the_tool_call_delta():
    text = "Let me check. " + CALL
    chunks = _stream(_StubState([text[i : i + 3] for i in range(0, len(text), 3)]))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check. "
    calls = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["type"] == "function"
    assert calls[0]["function"]["name"] == "get_weather" and json.loads(
        calls[0]["function"]["arguments"]
    ) == {"city": "Paris"}
    # No content after the call started; the call comes after all content; one finish, tool_calls.
    first_call = next(i for i, d in enumerate(deltas) if d.get("tool_calls"))
    assert all(not d.get("content") for d in deltas[first_call:])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == [
        "tool_calls"
    ]


# ---- rendering tools through the real tiny chat template --------------------------------------------


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_render_tools_and_tool_choice(tiny_llama_dir):
    tok = Tokenizer(tiny_llama_dir)
    ip = InputProcessor(tok, max_model_len=4096, vocab_size=2048)
    messages = [{"role": "user", "content": "weather?"}]

    def render(messages=messages, **fields) -> ChatPrompt:
        body = ChatCompletionRequest(messages=messages, **fields)
        tools, _ = _tools(body)
        return render_chat(ip, _messages(body), tools, "auto", 4000, "error")

    plain, auto = render(), render(tools=[TOOL])
    assert "get_weather" in tok.decode(auto.token_ids, skip_special_tokens=False)
    assert auto.parser == "auto" and auto.tool_names == {"get_weather"}
    none = render(tools=[TOOL], tool_choice="none")
    assert none.token_ids == plain.token_ids and none.parser is None
    # A forced call is a grammar on the output (tests/entrypoints/server/test_structured_output.py):
    # the prompt is the template's, nothing is started for the model.
    named = render(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.token_ids == auto.token_ids
    assert render(tools=[TOOL], tool_choice="required").token_ids == auto.token_ids
    with pytest.raises(InvalidRequest) as e:
        render(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.param == "tool_choice"
    # Assistant tool calls and tool results from earlier turns render too.
    history = messages + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    text = tok.decode(render(history, tools=[TOOL]).token_ids, skip_special_tokens=False)
    assert '{"city": "Paris"}' in text and "<tool_response>\nsunny" in text
