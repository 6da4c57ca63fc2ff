"""Agent runs as durable jobs on a real `loom serve`: POST returns at once, GET shows node results, the
events stream as SSE, cancel stops a run, bad workflows are 400s naming the field, and a run whose
server is killed resumes after a restart from its unfinished nodes (finished ones are not run again)."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

WORKFLOW = """
name: two_steps
inputs: [topic]
sampling: {max_tokens: 4, temperature: 0}
nodes:
  - name: first
    prompt: "Say one thing about {input.topic}."
  - name: second
    prompt: "Go on from: {first}"
    sampling: {max_tokens: SECOND_TOKENS, ignore_eos: true}
  - name: both
    kind: python
    function: collect
    deps: [first, second]
"""


def workflow(second_tokens: int) -> str:
    return WORKFLOW.replace("SECOND_TOKENS", str(second_tokens))


@pytest.fixture(scope="module")
def server(launch_server, tmp_path_factory):
    return launch_server(
        "agent-runs", "--state-dir", str(tmp_path_factory.mktemp("runs") / "state")
    ).wait_ready()


def wait_run(http: httpx.Client, run_id: str, until, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = http.get(f"/v1/agent/runs/{run_id}").json()
        if until(run) or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


def sse_events(http: httpx.Client, run_id: str) -> list[dict]:
    events = []
    with http.stream("GET", f"/v1/agent/runs/{run_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def test_run_is_accepted_at_once_and_reports_node_results(server):
    with server.http() as http:
        created = http.post("/v1/agent/runs", json={"workflow": workflow(8), "inputs": {"topic": "rivers"}})
        assert created.status_code == 200, created.text
        run = created.json()
        assert run["object"] == "agent.run" and run["status"] in ("queued", "running")
        live = sse_events(http, run["id"])  # follows the run live until it ends
        run = wait_run(http, run["id"], lambda r: r["status"] not in ("queued", "running"))
        assert run["status"] == "ok", run
        assert [n for n, v in run["nodes"].items() if v["status"] == "ok"] == ["first", "second", "both"]
        assert run["outputs"]["both"] == {
            "first": run["outputs"]["first"],
            "second": run["outputs"]["second"],
        }
        kinds = [e["kind"] for e in live]
        assert kinds[0] == "run_started" and kinds[-1] == "run_finished" and "token" in kinds
        assert kinds.index("node_finished") > kinds.index("node_started")
        replayed = [e["kind"] for e in sse_events(http, run["id"])]  # after the end: the stored events
        assert replayed == [k for k in kinds if k != "token"]
        assert run["id"] in [r["id"] for r in http.get("/v1/agent/runs").json()["data"]]


def test_cancel_stops_a_running_run(server):
    with server.http() as http:
        run = http.post("/v1/agent/runs", json={"workflow": workflow(3000), "inputs": {"topic": "x"}}).json()
        wait_run(http, run["id"], lambda r: r["nodes"].get("first", {}).get("status") == "ok")
        assert http.post(f"/v1/agent/runs/{run['id']}/cancel").status_code == 200
        run = wait_run(http, run["id"], lambda r: r["status"] != "running", timeout=60)
        assert run["status"] == "cancelled"
        assert run["nodes"]["second"]["status"] == "cancelled" and run["nodes"]["both"]["status"] == "skipped"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"workflow": "name: [unclosed"}, "workflow"),
        (
            {"workflow": {"nodes": [{"name": "a", "prompt": "{b}"}, {"name": "b", "prompt": "{a}"}]}},
            "workflow",
        ),
        ({"workflow": {"nodes": [{"name": "t", "kind": "tool", "tool": "no_such_tool"}]}}, "workflow"),
        ({"workflow": workflow(4)}, "inputs"),  # the required input `topic` is missing
        ({"workflow": workflow(4), "inputs": {"topic": "x"}, "policy": "yolo"}, "policy"),
        ({"workflow": workflow(4), "inputs": {"topic": "x"}, "colour": "red"}, "colour"),
    ],
)
def test_bad_workflows_are_400s_naming_the_field(server, body, param):
    with server.http() as http:
        before = len(http.get("/v1/agent/runs", params={"limit": 1000}).json()["data"])
        r = http.post("/v1/agent/runs", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert len(http.get("/v1/agent/runs", params={"limit": 1000}).json()["data"]) == before
        assert http.get("/v1/agent/runs/run_nope").status_code == 404


def test_run_resumes_after_kill_9_from_its_unfinished_nodes(launch_server, tmp_path):
    flags = ("--state-dir", str(tmp_path / "state"))
    server = launch_server("agent-resume-1", *flags).wait_ready()
    with server.http() as http:
        run = http.post(
            "/v1/agent/runs", json={"workflow": workflow(1500), "inputs": {"topic": "bees"}}
        ).json()
        before = wait_run(http, run["id"], lambda r: r["nodes"].get("first", {}).get("status") == "ok")
    assert before["status"] == "running" and "second" not in before["nodes"], "kill while `second` runs"
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    restarted = launch_server("agent-resume-2", *flags).wait_ready()
    try:
        with restarted.http() as http:
            after = wait_run(http, run["id"], lambda r: r["status"] not in ("queued", "running"), timeout=300)
            events = sse_events(http, run["id"])
    finally:
        restarted.stop()
    assert after["status"] == "ok", after
    assert after["incarnation"] == 2
    assert after["outputs"]["first"] == before["outputs"]["first"]
    second_life = [(e["kind"], e["node"]) for e in events if e["incarnation"] == 2]
    assert ("node_started", "first") not in second_life, "a finished node is not run again"
    assert ("node_started", "second") in second_life and ("node_finished", "both") in second_life
    resumed = [
        e for e in events if e["incarnation"] == 2 and e["kind"] == "node_finished" and e["node"] == "first"
    ]
    assert resumed and resumed[0]["data"]["resumed"] is True


def test_resume_does_not_start_a_run_this_process_already_runs(tmp_path):
    """The server answers requests while the model loads, before it resumes interrupted runs: a run
    created in that window is live already when resume() looks for `running` rows, and must not get a
    second runtime (that was a third incarnation after a kill -9: one too many before it)."""
    import asyncio

    from loom.agent.runtime import Runtime
    from loom.agent.tools import ToolRegistry
    from loom.jobs.agent_runs import AgentRuns
    from loom.jobs.db import Database

    spec = {"name": "py", "nodes": [{"name": "both", "kind": "python", "function": "collect"}]}

    async def main() -> tuple[dict, dict, int]:
        db = Database(tmp_path / "loom.db")
        runs = AgentRuns(db, lambda: Runtime(None, ToolRegistry()), ToolRegistry())
        created = runs.create(spec)
        interrupted = runs.create(spec)
        runs.live.pop(interrupted["id"])._task.cancel()  # as if the process had died with it running
        resumed = runs.resume()
        for _ in range(200):
            if not runs.live:
                break
            await asyncio.sleep(0.01)
        out = runs.get(created["id"]), runs.get(interrupted["id"]), resumed
        db.close()
        return out

    created, interrupted, resumed = asyncio.run(main())
    assert resumed == 1
    assert created["status"] == "ok" and created["incarnation"] == 1
    assert interrupted["status"] == "ok" and interrupted["incarnation"] == 2
