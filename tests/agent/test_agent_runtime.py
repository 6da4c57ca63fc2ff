"""The executor: dataflow order and overlap, timeouts, retries, failure policies, cancellation, events."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from agent_fakes import FakeClient

from loom.agent.errors import NodeTimeout, RunFailed, TemplateError, WorkflowError
from loom.agent.graph import Workflow
from loom.agent.runtime import CONTINUE, Runtime


def sleeper(seconds: float, value=None, log: list | None = None):
    async def fn():
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            if log is not None:
                log.append("cancelled")
            raise
        return value

    return fn


def run(coro):
    return asyncio.run(coro)


def test_dependencies_order_and_independent_nodes_overlap():
    wf = Workflow()
    for name in ("a", "b", "c"):
        wf.python(name, sleeper(0.3, name))

    @wf.node()
    def join(a, b, c):
        return a + b + c

    t0 = time.monotonic()
    result = run(Runtime().run(wf))
    wall = time.monotonic() - t0
    assert result.ok and result.outputs["join"] == "abc"
    nodes = result.record.nodes
    assert nodes["join"].start >= max(nodes[n].end for n in "abc")
    assert wall < 0.8, f"three 0.3 s nodes should overlap, took {wall:.2f} s"


def test_a_node_starts_when_its_own_inputs_are_ready():
    wf = Workflow()
    wf.python("fast", sleeper(0.05, 1))
    wf.python("slow", sleeper(0.6, 2))
    wf.python("after_fast", lambda fast: fast + 1)
    result = run(Runtime().run(wf))
    nodes = result.record.nodes
    assert nodes["after_fast"].end < nodes["slow"].end  # no barrier waiting for `slow`


def test_timeout_cancels_the_attempt():
    log: list = []
    wf = Workflow()
    wf.python("stuck", sleeper(30, log=log), timeout=0.2)
    t0 = time.monotonic()
    result = run(Runtime().run(wf))
    assert time.monotonic() - t0 < 5
    assert result.status == "failed"
    assert isinstance(result.errors["stuck"], NodeTimeout)
    assert log == ["cancelled"]
    with pytest.raises(RunFailed, match="timed out"):
        result.raise_for_errors()


def test_retries_back_off_exponentially():
    stamps: list[float] = []

    async def flaky():
        stamps.append(time.monotonic())
        if len(stamps) < 3:
            raise ConnectionError("try again")
        return "ok"

    wf = Workflow()
    wf.python("flaky", flaky, retries=3, backoff=0.1)
    result = run(Runtime().run(wf))
    assert result.ok and result.outputs["flaky"] == "ok"
    assert len(stamps) == 3 and result.record.nodes["flaky"].retries == 2
    assert stamps[1] - stamps[0] >= 0.09 and stamps[2] - stamps[1] >= 0.18  # 0.1 then 0.2
    delays = [e.data["delay"] for e in result.events if e.kind == "node_retrying"]
    assert delays == [0.1, 0.2]

    stamps.clear()
    wf = Workflow()
    wf.python("flaky", flaky, retries=1, backoff=0.01)
    result = run(Runtime().run(wf))
    assert isinstance(result.errors["flaky"], ConnectionError) and len(stamps) == 2


def test_workflow_errors_are_not_retried():
    wf = Workflow()
    wf.python("a", lambda: {"x": 1})
    wf.tool("b", "calculator", {"expression": "{a.missing}"}, retries=5, backoff=0.01)
    from loom.agent.builtin_tools import builtin_tools

    result = run(Runtime(tools=builtin_tools()).run(wf))
    assert isinstance(result.errors["b"], TemplateError)
    assert len(result.record.nodes["b"].attempts) == 1


def failing_workflow(log: list) -> Workflow:
    async def bad():
        await asyncio.sleep(0.05)
        raise ValueError("boom")

    wf = Workflow()
    wf.python("bad", bad)
    wf.python("slow", sleeper(0.5, "slow", log))
    wf.python("child", lambda bad: bad)
    wf.python("grandchild", lambda child: child)
    wf.python("other", sleeper(0.01, "other"))
    wf.python("other_child", lambda other, slow: other + slow)
    return wf


def test_fail_fast_cancels_everything_still_running():
    log: list = []
    t0 = time.monotonic()
    result = run(Runtime().run(failing_workflow(log)))
    assert time.monotonic() - t0 < 0.45
    assert result.status == "failed" and set(result.errors) == {"bad"}
    assert result.cancelled == ["slow"] and log == ["cancelled"]
    assert set(result.skipped) == {"child", "grandchild", "other_child"}
    assert result.outputs == {"other": "other"}


def test_continue_runs_what_does_not_depend_on_the_failure():
    log: list = []
    result = run(Runtime(policy=CONTINUE).run(failing_workflow(log)))
    assert result.status == "failed" and set(result.errors) == {"bad"}
    assert result.outputs == {"slow": "slow", "other": "other", "other_child": "otherslow"}
    assert set(result.skipped) == {"child", "grandchild"} and not log
    assert "upstream node 'bad' failed" in result.record.nodes["grandchild"].error


def test_cancel_from_outside_with_the_handle():
    log: list = []
    wf = Workflow()
    wf.python("slow", sleeper(30, log=log))
    wf.python("after", lambda slow: slow)

    async def main():
        handle = Runtime().start(wf)
        await asyncio.sleep(0.1)
        handle.cancel()
        return await handle

    result = run(main())
    assert result.status == "cancelled" and result.cancelled == ["slow"] and result.skipped == ["after"]
    assert log == ["cancelled"]

    async def cancel_at_once():
        handle = Runtime().start(wf)
        handle.cancel()
        return await handle

    result = run(cancel_at_once())
    assert result.status == "cancelled" and result.skipped == ["slow", "after"] and result.outputs == {}


def test_cancelling_the_task_cancels_the_run():
    log: list = []
    wf = Workflow()
    wf.python("slow", sleeper(30, log=log))

    async def main():
        task = asyncio.create_task(Runtime().run(wf))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert run(main()) == []
    assert log == ["cancelled"]


def test_deadline_stops_the_run():
    wf = Workflow()
    wf.python("quick", sleeper(0.01, 1))
    wf.python("slow", sleeper(30))
    t0 = time.monotonic()
    result = run(Runtime().run(wf, deadline=0.3))
    assert time.monotonic() - t0 < 5
    assert (
        result.status == "deadline_exceeded"
        and result.outputs == {"quick": 1}
        and result.cancelled == ["slow"]
    )


def test_invalid_workflows_are_rejected_before_anything_runs():
    ran: list = []
    wf = Workflow()
    wf.python("starter", lambda: ran.append(1))
    wf.python("a", lambda b: b)
    wf.python("b", lambda a: a)

    async def main():
        with pytest.raises(WorkflowError, match="a -> b -> a"):
            Runtime().start(wf)
        wf2 = Workflow()
        wf2.python("starter", lambda: ran.append(1))
        wf2.python("x", lambda: 1, deps=["ghost"])
        with pytest.raises(WorkflowError, match="unknown node 'ghost'"):
            Runtime().start(wf2)
        wf3 = Workflow()
        wf3.python("starter", lambda: ran.append(1))
        wf3.llm("ask", "{input.question}")
        with pytest.raises(WorkflowError, match="missing input 'question'"):
            Runtime(client=object()).start(wf3)
        with pytest.raises(WorkflowError, match="no client"):
            Runtime().start(wf3, {"question": "q"})
        await asyncio.sleep(0.05)

    run(main())
    assert ran == []


def test_events_and_record(tmp_path):
    wf = Workflow("events")
    wf.python("prep", sleeper(0.05, "data"))
    wf.llm("say", "Tell me about {prep}")
    client = FakeClient(replies=["one two three"])
    seen: list = []

    async def main():
        handle = Runtime(client).start(wf, on_event=seen.append)
        followed = [e async for e in handle.events()]
        return followed, await handle

    followed, result = run(main())
    kinds = [e.kind for e in followed]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.index("node_finished") < kinds.index("token")
    assert [e.data["text"] for e in followed if e.kind == "token"] == ["one", "two", "three"]
    assert [e.kind for e in seen] == kinds
    assert all(a.time <= b.time for a, b in zip(followed, followed[1:], strict=False))
    record = json.loads(result.record.to_json())
    assert record["status"] == "ok" and record["nodes"]["say"]["llm_calls"] == 1
    assert record["nodes"]["say"]["prompt_tokens"] > 0 and record["nodes"]["prep"]["retries"] == 0
    png = tmp_path / "timeline.png"
    result.record.timeline_png(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
