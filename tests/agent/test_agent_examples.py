"""The examples, end to end on the built-in tiny model in-process (random text: assert structure,
timing and cache reuse, not wording), plus plan_execute with a scripted planner."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from pathlib import Path

import pytest
from agent_fakes import FakeClient

from loom.agent.builtin_tools import builtin_tools
from loom.agent.cli import add_run_parser
from loom.agent.errors import OutputError
from loom.agent.loader import load_workflow
from loom.agent.runtime import CONTINUE, Runtime

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DOCUMENT = " ".join(
    f"Section {i}: the river ran low that summer, and the people of the valley walked its dry bed to count the stones."
    for i in range(10)
)
BRANCHES = ["claims", "evidence", "methods", "numbers", "risks", "assumptions", "related", "next_steps"]


def test_research_fanout_branches_overlap_and_share_the_document_prefix(engine_client):
    loop, client = engine_client
    wf = load_workflow(EXAMPLES / "research_fanout.yaml")
    wf.sampling["max_tokens"] = 4
    seen: list = []
    generate = client.engine.generate

    def recording(request):
        seen.append(request.params.extra.get("program_id"))
        return generate(request)

    client.engine.generate = recording  # observe what reaches the engine
    try:
        result = loop.run(Runtime(client).run(wf, {"document": DOCUMENT}))
    finally:
        del client.engine.generate
    assert result.ok, result.errors
    assert set(result.outputs) == {*BRANCHES, "summary"}
    assert all(isinstance(v, str) for v in result.outputs.values())
    nodes = result.record.nodes
    assert max(nodes[b].start for b in BRANCHES) < min(
        nodes[b].end for b in BRANCHES
    )  # all in flight at once
    assert nodes["summary"].start >= max(nodes[b].end for b in BRANCHES)
    assert seen == [result.record.program_id] * 9
    # The run's end unpins the program's KV (the engine thread handles it within its 0.5 s inbox poll).
    kv = client.engine.core.kv
    for _ in range(40):
        if result.record.program_id not in getattr(kv, "pins", {}):
            break
        time.sleep(0.05)
    assert result.record.program_id not in getattr(kv, "pins", {})
    # The document comes first in every branch: once one branch computed it, the others reuse its KV.
    prompt = min(nodes[b].prompt_tokens for b in BRANCHES)
    reused = [nodes[b].cached_tokens for b in BRANCHES if nodes[b].cached_tokens >= prompt // 2]
    assert len(reused) >= 4, [nodes[b].cached_tokens for b in BRANCHES]
    assert all(nodes[b].completion_tokens <= 4 for b in BRANCHES)


def test_tool_agent_runs_its_tools_and_the_agent(engine_client):
    loop, client = engine_client
    wf = load_workflow(EXAMPLES / "tool_agent.yaml")
    wf.sampling["max_tokens"] = 8
    tools = builtin_tools(sandbox=EXAMPLES / "data")
    result = loop.run(Runtime(client, tools).run(wf, {"question": "How many hours in total?"}))
    assert result.ok, result.errors
    assert result.outputs["notes"] == (EXAMPLES / "data" / "notes.txt").read_text()
    assert result.outputs["estimate"] == pytest.approx(11.4)
    assert isinstance(result.outputs["agent"], str)
    agent = result.record.nodes["agent"]
    assert 1 <= agent.llm_calls <= 4 and agent.prompt_tokens > 0


def test_plan_execute_on_the_tiny_model_fails_cleanly_at_the_planner(engine_client):
    loop, client = engine_client
    wf = load_workflow(EXAMPLES / "plan_execute.yaml")
    wf.sampling["max_tokens"] = 6
    wf.nodes["planner"] = dataclasses.replace(wf.nodes["planner"], backoff=0.01)
    result = loop.run(Runtime(client, policy=CONTINUE).run(wf, {"goal": "a workshop"}))
    # Random weights do not write JSON: the planner fails (after its retries) with a typed error.
    assert result.status == "failed" and isinstance(result.errors["planner"], OutputError)
    assert len(result.record.nodes["planner"].attempts) == 3
    assert set(result.skipped) == {"step_1", "step_2", "step_3", "answer", "report"}


def test_plan_execute_with_a_scripted_planner():
    def reply(messages):
        if "You plan work" in messages[0]["content"]:
            return '{"steps": ["book a room", "write exercises", "invite people"]}'
        return "done: " + messages[-1]["content"].splitlines()[-1]

    wf = load_workflow(EXAMPLES / "plan_execute.yaml")
    client = FakeClient(replies=reply, delay=0.2)
    result = asyncio.run(Runtime(client).run(wf, {"goal": "a workshop"}))
    assert result.ok, result.errors
    report = result.outputs["report"]
    assert report["planner"]["steps"][1] == "write exercises"
    assert report["step_2"] == "done: Your step: write exercises"
    nodes = result.record.nodes
    steps = [nodes[f"step_{i}"] for i in (1, 2, 3)]
    assert max(s.start for s in steps) < min(s.end for s in steps)  # the executors run in parallel


def test_cli_runs_a_workflow_in_process(tiny_llama_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="loom")
    add_run_parser(parser.add_subparsers(dest="command", required=True))
    record, timeline = tmp_path / "run.json", tmp_path / "run.png"
    args = parser.parse_args(
        [
            "run",
            str(EXAMPLES / "tool_agent.yaml"),
            "--input",
            "question=How long?",
            "--sandbox",
            str(EXAMPLES / "data"),
        ]
        + ["--model", str(tiny_llama_dir), "--num-blocks", "256", "--max-tokens", "4", "-q"]
        + ["--record", str(record), "--timeline", str(timeline)]
    )
    args.func(args)
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "ok" and printed["outputs"]["estimate"] == pytest.approx(11.4)
    assert printed["totals"]["llm_calls"] >= 1
    assert json.loads(record.read_text())["nodes"]["agent"]["status"] == "ok"
    assert timeline.read_bytes()[:4] == b"\x89PNG"
