"""Agent workflow runs as durable jobs: accepted at once, run by the same Runtime as `loom run`, their
node outputs and events stored as they happen, resumed after a restart from the unfinished nodes.

A run's row says its status; `agent_nodes` holds each finished node's output; `agent_events` every event
but tokens (those are only streamed live). A restart finds runs still `queued` or `running`, and starts
each again with its finished nodes' outputs given back to the runtime (`completed=`), so only what had
not finished runs again. Each start is an incarnation; events carry it, so a reader of a resumed run's
events sees what happened before the restart, then what happens now.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import yaml

from loom.agent.errors import WorkflowError
from loom.agent.events import Event
from loom.agent.loader import workflow_from_dict
from loom.agent.runtime import POLICIES, RunHandle, Runtime
from loom.agent.tools import ToolRegistry
from loom.errors import InvalidRequest, NotFound
from loom.jobs.db import Database

logger = logging.getLogger(__name__)

FINISHED = ("ok", "failed", "cancelled", "deadline_exceeded")
NODE_DONE = {
    "node_finished": "ok",
    "node_failed": "failed",
    "node_skipped": "skipped",
    "node_cancelled": "cancelled",
}


def _json(value: Any) -> str:
    return json.dumps(value, default=str)


def parse_workflow(spec: Any) -> dict[str, Any]:
    """The workflow's dict form from YAML text or a JSON object."""
    if isinstance(spec, str):
        try:
            spec = yaml.safe_load(spec)
        except yaml.YAMLError as e:
            raise InvalidRequest(f"the workflow is not valid YAML: {e}", param="workflow") from None
    if not isinstance(spec, dict):
        raise InvalidRequest("workflow must be a workflow object or its YAML text", param="workflow")
    return spec


class AgentRuns:
    """Starts, follows, cancels and resumes agent runs. `make_runtime()` gives a Runtime on the server's
    model (a client over its own API) and tools."""

    def __init__(
        self,
        db: Database,
        make_runtime: Callable[[], Runtime],
        tools: ToolRegistry,
        stopping: Callable[[], bool] = lambda: False,
    ):
        self.db = db
        self.make_runtime = make_runtime
        self.tools = tools
        self.stopping = stopping
        """Whether the server is shutting down (draining): failures then are the shutdown's, not the
        run's, and are not stored, so the run resumes at the next start."""
        self.live: dict[str, RunHandle] = {}
        self._stopping = False

    # ---- the API's operations --------------------------------------------------------------------

    def create(
        self, workflow: Any, inputs: Any = None, policy: str | None = None, deadline: float | None = None
    ) -> dict:
        """Check everything that can be checked, store the run, start it; returns the run object."""
        spec = parse_workflow(workflow)
        if inputs is not None and not isinstance(inputs, dict):
            raise InvalidRequest("inputs must be an object of input name -> value", param="inputs")
        if policy is not None and policy not in POLICIES:
            raise InvalidRequest(f"policy must be one of {POLICIES}, got {policy!r}", param="policy")
        if deadline is not None and not (isinstance(deadline, int | float) and deadline > 0):
            raise InvalidRequest(
                f"deadline must be a positive number of seconds, got {deadline!r}", param="deadline"
            )
        try:
            wf = workflow_from_dict(spec)
            wf.validate(tools=self.tools)
        except WorkflowError as e:
            raise InvalidRequest(f"invalid workflow: {e}", param="workflow") from None
        try:
            wf.resolve_inputs(inputs or {})
        except WorkflowError as e:
            raise InvalidRequest(str(e), param="inputs") from None
        run_id = f"run_{uuid.uuid4().hex}"
        options = {"policy": policy, "deadline": deadline}
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO agent_runs (id, workflow, inputs, options, status, created_at)"
                " VALUES (?, ?, ?, ?, 'queued', ?)",
                (run_id, _json(spec), _json(inputs or {}), _json(options), int(time.time())),
            )
        self._start(run_id)
        return self.get(run_id)

    def get(self, run_id: str) -> dict[str, Any]:
        row = self._row(run_id)
        workflow = json.loads(row["workflow"])
        rows = {r["node"]: r for r in self.db.query("SELECT * FROM agent_nodes WHERE run_id = ?", (run_id,))}
        order = [n.get("name") for n in workflow.get("nodes", []) if isinstance(n, dict)]
        nodes = {
            name: {
                "status": r["status"],
                "output": json.loads(r["output"]) if r["output"] is not None else None,
                "error": r["error"],
            }
            for name in order
            if (r := rows.get(name)) is not None
        }
        return {
            "id": run_id,
            "object": "agent.run",
            "workflow": workflow.get("name", "workflow"),
            "status": row["status"],
            "created_at": row["created_at"],
            "finished_at": row["finished_at"],
            "inputs": json.loads(row["inputs"]),
            "nodes": nodes,
            "outputs": {name: n["output"] for name, n in nodes.items() if n["status"] == "ok"},
            "error": row["error"],
            "incarnation": row["incarnation"],
        }

    def list(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.db.query("SELECT id FROM agent_runs ORDER BY created_at DESC, id DESC LIMIT ?", (limit,))
        return [self.get(r["id"]) for r in rows]

    def cancel(self, run_id: str) -> dict[str, Any]:
        row = self._row(run_id)
        handle = self.live.get(run_id)
        if handle is not None:
            handle.cancel()
        elif row["status"] not in FINISHED:
            self._set_status(run_id, "cancelled")
        return self.get(run_id)

    async def events(self, run_id: str) -> AsyncIterator[dict[str, Any]]:
        """Every event of the run: stored ones of earlier incarnations, then the live ones (or, for a run
        not running here, all stored ones)."""
        row = self._row(run_id)
        handle = self.live.get(run_id)
        before = row["incarnation"] if handle is not None else None
        sql = "SELECT * FROM agent_events WHERE run_id = ?" + (
            " AND incarnation < ?" if before is not None else ""
        )
        args = (run_id, before) if before is not None else (run_id,)
        for r in self.db.query(sql + " ORDER BY seq", args):
            yield {
                "kind": r["kind"],
                "node": r["node"],
                "incarnation": r["incarnation"],
                **json.loads(r["data"]),
            }
        if handle is not None:
            async for event in handle.events():
                yield self._event_dict(event, before)

    # ---- lifecycle -------------------------------------------------------------------------------

    def resume(self) -> int:
        """At start: run again every run a stop or crash interrupted. Returns how many.

        Requests are served while the model loads, so a run created since this process started may
        already be live here (its row says `running` too): that one is not started a second time."""
        rows = self.db.query("SELECT id FROM agent_runs WHERE status IN ('queued', 'running')")
        resumed = [r["id"] for r in rows if r["id"] not in self.live]
        for run_id in resumed:
            logger.info("resuming agent run %s", run_id)
            self._start(run_id)
        return len(resumed)

    async def stop(self) -> None:
        """Shutting down: stop the live runs without marking them cancelled, so the next start resumes them."""
        self._stopping = True
        for handle in list(self.live.values()):
            handle.cancel()
        for handle in list(self.live.values()):
            try:
                await handle.result()
            except BaseException:  # noqa: BLE001 - shutting down regardless
                logger.exception("agent run did not stop cleanly")
        self.live.clear()

    # ---- internals -------------------------------------------------------------------------------

    def _row(self, run_id: str):
        row = self.db.one("SELECT * FROM agent_runs WHERE id = ?", (run_id,))
        if row is None:
            raise NotFound(f"no agent run with id {run_id!r}", param="run_id")
        return row

    def _start(self, run_id: str) -> None:
        if run_id in self.live:  # one runtime per run: two would both write its nodes and events
            raise RuntimeError(f"agent run {run_id} is already running")
        row = self._row(run_id)
        incarnation = row["incarnation"] + 1
        completed = {
            r["node"]: json.loads(r["output"])
            for r in self.db.query(
                "SELECT node, output FROM agent_nodes WHERE run_id = ? AND status = 'ok'", (run_id,)
            )
        }
        with self.db.transaction() as conn:
            # Nodes that had not finished when the run stopped start over.
            conn.execute("DELETE FROM agent_nodes WHERE run_id = ? AND status != 'ok'", (run_id,))
            conn.execute(
                "UPDATE agent_runs SET status = 'running', incarnation = ? WHERE id = ?",
                (incarnation, run_id),
            )
        options = json.loads(row["options"])
        workflow = workflow_from_dict(json.loads(row["workflow"]))
        seq = self.db.one("SELECT COALESCE(MAX(seq), -1) AS n FROM agent_events WHERE run_id = ?", (run_id,))[
            "n"
        ]
        counter = iter(range(seq + 1, 2**62))

        def on_event(event: Event) -> None:
            if event.kind == "token" or self._stopping:
                return
            if self.stopping() and event.kind in (
                "node_failed",
                "node_cancelled",
                "node_skipped",
                "run_finished",
            ):
                return
            self._record(run_id, incarnation, next(counter), event)

        handle = self.make_runtime().start(
            workflow,
            json.loads(row["inputs"]),
            policy=options.get("policy"),
            deadline=options.get("deadline"),
            program_id=run_id,
            on_event=on_event,
            completed=completed,
        )
        self.live[run_id] = handle

        def forget(_: object) -> None:
            if self.live.get(run_id) is handle:  # not a later incarnation's handle
                del self.live[run_id]

        handle._task.add_done_callback(forget)

    def _record(self, run_id: str, incarnation: int, seq: int, event: Event) -> None:
        data = {"time": event.time, "data": event.data}
        try:
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT INTO agent_events (run_id, seq, incarnation, kind, node, data) VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, seq, incarnation, event.kind, event.node, _json(data)),
                )
                status = NODE_DONE.get(event.kind)
                if status is not None and not event.data.get("resumed"):
                    conn.execute(
                        "INSERT OR REPLACE INTO agent_nodes (run_id, node, status, output, error) VALUES (?, ?, ?, ?, ?)",
                        (
                            run_id,
                            event.node,
                            status,
                            _json(event.data.get("output")) if status == "ok" else None,
                            event.data.get("error") or event.data.get("reason"),
                        ),
                    )
                if event.kind == "run_finished":
                    errors = event.data.get("errors") or {}
                    conn.execute(
                        "UPDATE agent_runs SET status = ?, finished_at = ?, error = ? WHERE id = ?",
                        (event.data["status"], int(time.time()), _json(errors) if errors else None, run_id),
                    )
        except Exception:  # a full disk must not fail the run itself; the run resumes from what is stored
            logger.exception("could not store an event of agent run %s", run_id)

    def _set_status(self, run_id: str, status: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE agent_runs SET status = ?, finished_at = ? WHERE id = ?",
                (status, int(time.time()), run_id),
            )

    @staticmethod
    def _event_dict(event: Event, incarnation: int | None) -> dict[str, Any]:
        return {
            "kind": event.kind,
            "node": event.node,
            "incarnation": incarnation,
            "time": event.time,
            "data": json.loads(_json(event.data)),
        }
