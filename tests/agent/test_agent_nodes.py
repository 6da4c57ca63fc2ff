"""llm and agent nodes against a scripted client: JSON output parsing and validation, the tool-calling
loop, program ids and sampling. (The model's *output* is faked; the runtime around it is real.)"""

from __future__ import annotations

import asyncio

import pytest
from agent_fakes import FakeClient, tool_call_reply

from loom.agent.builtin_tools import builtin_tools
from loom.agent.errors import MaxStepsExceeded, OutputError
from loom.agent.graph import Workflow
from loom.agent.nodes import parse_json_output
from loom.agent.runtime import Runtime

PLAN = {
    "type": "object",
    "required": ["steps"],
    "properties": {"steps": {"type": "array", "items": {"type": "string"}}},
}


def test_json_output_is_found_parsed_and_validated():
    assert parse_json_output('{"steps": ["a"]}', PLAN) == {"steps": ["a"]}
    assert parse_json_output('```json\n{"steps": ["a"]}\n```', PLAN) == {"steps": ["a"]}
    assert parse_json_output('Sure! Here it is: {"steps": ["a", "b"]} Hope it helps.', PLAN) == {
        "steps": ["a", "b"]
    }
    assert parse_json_output("[1, 2]", None) == [1, 2]
    with pytest.raises(OutputError, match="not JSON"):
        parse_json_output("no json at all", PLAN)
    with pytest.raises(OutputError, match=r"\$\.steps\[0\]: expected string"):
        parse_json_output('{"steps": [1]}', PLAN)
    with pytest.raises(OutputError, match="missing required property 'steps'"):
        parse_json_output('{"plan": []}', PLAN)


def test_llm_json_node_retries_until_the_reply_validates():
    wf = Workflow("plan", sampling={"max_tokens": 64, "temperature": 0.0})
    wf.llm("planner", "Plan {input.goal}", schema=PLAN, retries=2, backoff=0.01, temperature=0.7)
    wf.llm("step", "Do {planner.steps.1}")
    client = FakeClient(replies=["I think the plan is...", '{"steps": ["x", "y"]}', "done"])
    result = asyncio.run(Runtime(client).run(wf, {"goal": "tests"}))
    assert result.ok, result.errors
    assert result.outputs == {"planner": {"steps": ["x", "y"]}, "step": "done"}
    assert result.record.nodes["planner"].retries == 1
    assert client.calls[2]["messages"] == [{"role": "user", "content": "Do y"}]
    # Every call carries the run's program id; node sampling overrides the workflow's defaults.
    assert {c["program_id"] for c in client.calls} == {result.record.program_id}
    assert client.ended == [result.record.program_id]  # told the serving side the program is over
    # The schema goes to the client as a constraint (the engine enforces it; a client that cannot is
    # still checked and retried, as here).
    assert client.calls[0]["sampling"] == {
        "max_tokens": 64,
        "temperature": 0.7,
        "structured_outputs": {"json": PLAN},
    }
    assert client.calls[2]["sampling"] == {"max_tokens": 64, "temperature": 0.0}


def test_llm_json_node_fails_with_output_error_after_its_retries():
    wf = Workflow()
    wf.llm("planner", "Plan", schema=PLAN, retries=1, backoff=0.01)
    result = asyncio.run(Runtime(FakeClient(replies=['{"steps": "not a list"}'])).run(wf))
    assert isinstance(result.errors["planner"], OutputError)
    assert len(result.record.nodes["planner"].attempts) == 2


def test_agent_calls_tools_and_feeds_results_back():
    wf = Workflow()
    wf.agent("solver", "What is 6*7?", tools=["calculator"], max_steps=4)
    client = FakeClient(
        replies=[
            tool_call_reply("calculator", '{"expression": "6*7"}', "c1"),
            tool_call_reply("calculator", "__import__('os').system('echo pwned')", "c2"),
            tool_call_reply("read_file", '{"path": "/etc/passwd"}', "c3"),
            "The answer is 42.",
        ]
    )
    result = asyncio.run(Runtime(client, builtin_tools()).run(wf))
    assert result.ok and result.outputs["solver"] == "The answer is 42."
    final = client.calls[-1]["messages"]
    tool_replies = [m for m in final if m["role"] == "tool"]
    assert tool_replies[0] == {"role": "tool", "tool_call_id": "c1", "content": "42"}
    assert tool_replies[1]["content"].startswith("error:") and "not valid JSON" in tool_replies[1]["content"]
    assert "not available here" in tool_replies[2]["content"]
    assert final[1]["tool_calls"][0]["function"] == {
        "name": "calculator",
        "arguments": '{"expression": "6*7"}',
    }
    assert client.calls[0]["tools"][0]["function"]["name"] == "calculator"
    rec = result.record.nodes["solver"]
    assert rec.llm_calls == 4 and rec.tool_calls == 3
    oks = [e.data["ok"] for e in result.events if e.kind == "tool_call"]
    assert oks == [True, False, False]


def test_a_tool_result_json_cannot_carry_is_an_error_reply_not_a_failed_node():
    """9**23000 has 21,947 digits (past Python's int-to-str limit) and 1e308*10 is inf: both used to
    fail the whole agent node; now the model is told, and can go on."""
    wf = Workflow()
    wf.agent("solver", "big numbers", tools=["calculator"], max_steps=3)
    client = FakeClient(
        replies=[
            tool_call_reply("calculator", '{"expression": "9 ** 23000"}', "c1"),
            tool_call_reply("calculator", '{"expression": "1e308 * 10"}', "c2"),
            "Too large.",
        ]
    )
    result = asyncio.run(Runtime(client, builtin_tools()).run(wf))
    assert result.ok and result.outputs["solver"] == "Too large."
    replies = [m["content"] for m in client.calls[-1]["messages"] if m["role"] == "tool"]
    assert replies[0].startswith("error:") and "4000 digits" in replies[0]
    assert replies[1].startswith("error:") and "overflows" in replies[1]


def test_agent_gives_up_after_max_steps():
    wf = Workflow()
    wf.agent("loop", "go", tools=["calculator"], max_steps=2)
    client = FakeClient(replies=[tool_call_reply("calculator", '{"expression": "1+1"}')])
    result = asyncio.run(Runtime(client, builtin_tools()).run(wf))
    assert isinstance(result.errors["loop"], MaxStepsExceeded) and len(client.calls) == 2


def test_llm_node_with_tools_returns_the_calls_without_running_them():
    wf = Workflow()
    wf.llm("route", "pick a tool", tools=["calculator"])
    client = FakeClient(replies=[tool_call_reply("calculator", '{"expression": "2+2"}')])
    result = asyncio.run(Runtime(client, builtin_tools()).run(wf))
    assert result.outputs["route"] == {
        "content": "",
        "tool_calls": [{"name": "calculator", "arguments": {"expression": "2+2"}}],
    }
    assert result.record.nodes["route"].tool_calls == 0
