"""The same workflow through loom's OpenAI-compatible server (real `loom serve` on loopback, the real
openai SDK): program_id reaches the engine, branches share the document's KV, and the run's end
releases the program's pinned KV through the server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from loom.agent.clients import OpenAIClient
from loom.agent.loader import load_workflow
from loom.agent.runtime import Runtime

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DOCUMENT = " ".join(f"Paragraph {i}: the valley kept its records in stone and in song." for i in range(12))
BRANCHES = ["claims", "evidence", "methods", "numbers", "risks", "assumptions", "related", "next_steps"]


def test_research_fanout_over_http_shares_prefix_and_releases_pins(launch_server):
    server = launch_server("agent-http", "--program-pin-ttl-s", "600").wait_ready()
    wf = load_workflow(EXAMPLES / "research_fanout.yaml")
    wf.sampling["max_tokens"] = 4

    async def run():
        client = OpenAIClient(server.url + "/v1", "unused", model=server.model)
        result = await Runtime(client).run(wf, {"document": DOCUMENT})
        await asyncio.sleep(0)  # let the background release request go out
        await asyncio.gather(*client._releases)
        return result

    result = asyncio.run(run())
    assert result.ok, result.errors
    nodes = result.record.nodes
    assert max(nodes[b].start for b in BRANCHES) < min(nodes[b].end for b in BRANCHES)
    assert sum(nodes[b].cached_tokens > 0 for b in BRANCHES) >= 4, [nodes[b].cached_tokens for b in BRANCHES]
    deadline = time.monotonic() + 10
    while server.metric("loom_kv_pinned_blocks") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("loom_kv_pinned_blocks") == 0, (
        "the run's end should release its pins now, not at TTL"
    )
    assert server.metric("loom_prefix_cache_hits_total") > 0


def test_constrained_nodes_over_http(launch_server):
    """plan_execute's planner schema goes out as response_format and the phone agent's grammar as
    structured_outputs: the server enforces both, so the random-weight model's replies parse."""
    server = launch_server("agent-http").wait_ready()
    plan = load_workflow(EXAMPLES / "plan_execute.yaml")
    for name in ("step_1", "step_2", "step_3", "answer"):
        plan.nodes[name].sampling["max_tokens"] = 8
    phone = load_workflow(EXAMPLES / "phone_agent.yaml")

    async def run():
        client = OpenAIClient(server.url + "/v1", "unused", model=server.model)
        return (
            await Runtime(client).run(plan, {"goal": "a workshop"}),
            await Runtime(client).run(phone, {"task": "Turn on Wi-Fi"}),
        )

    planned, acted = asyncio.run(run())
    assert planned.ok, planned.errors
    assert len(planned.outputs["planner"]["steps"]) == 3
    assert acted.ok, acted.errors
    assert acted.outputs["action"].startswith(("do(action=", "finish(message="))
