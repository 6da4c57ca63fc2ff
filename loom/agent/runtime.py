"""The executor: runs a workflow as asyncio dataflow. A node starts the moment its last dependency
finishes (no super-steps); each attempt has a timeout, failures retry with exponential backoff, and
the run has a deadline, a failure policy and can be cancelled from outside.

```python
runtime = Runtime(client, tools)
handle = runtime.start(workflow, {"question": "..."})
async for event in handle.events():
    ...
result = await handle          # RunResult: outputs, errors, record
```
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Generator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from loom.agent.clients import ChatClient
from loom.agent.errors import NodeTimeout, RunFailed, WorkflowError
from loom.agent.events import Event, EventCallback, EventLog
from loom.agent.graph import LLMNode, Workflow
from loom.agent.nodes import NodeContext, run_node
from loom.agent.record import Attempt, NodeRecord, RunRecord
from loom.agent.template import INPUT
from loom.agent.tools import ToolRegistry
from loom.errors import InvalidRequest

logger = logging.getLogger(__name__)

FAIL_FAST = "fail_fast"
"""On the first failure (after retries) cancel everything still running and start nothing more."""
CONTINUE = "continue"
"""On a failure skip what depends on it and run everything else."""
POLICIES = (FAIL_FAST, CONTINUE)
NOT_RETRIED = (WorkflowError, InvalidRequest)
"""Errors that fail the same way every time: a bad template, an unknown tool, a prompt too long."""


@dataclass
class RunResult:
    """How a run ended: outputs of the nodes that finished, errors of those that failed."""

    status: str
    """ok, failed, cancelled or deadline_exceeded."""
    outputs: dict[str, Any]
    errors: dict[str, BaseException]
    """Node -> the error it failed with (after its retries)."""
    skipped: list[str] = field(default_factory=list)
    """Nodes never started: an upstream node failed, or the run stopped first."""
    cancelled: list[str] = field(default_factory=list)
    """Nodes that were running when the run stopped."""
    record: RunRecord | None = None
    events: list[Event] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def raise_for_errors(self) -> None:
        """Raise RunFailed unless the run finished ok."""
        if not self.ok:
            detail = "; ".join(f"{n}: {type(e).__name__}: {e}" for n, e in self.errors.items())
            raise RunFailed(f"run {self.status}" + (f" ({detail})" if detail else ""), self.errors)


class RunHandle:
    """A run in progress: await it for the RunResult, follow its events, or cancel it."""

    def __init__(self, run: _Run, task: asyncio.Task[RunResult]):
        self._run = run
        self._task = task
        self.run_id = run.record.run_id
        self.program_id = run.record.program_id
        self.record = run.record

    def cancel(self) -> None:
        """Stop the run: running nodes are cancelled and the result has status `cancelled`."""
        self._run.cancel_requested.set()

    def done(self) -> bool:
        return self._task.done()

    def events(self) -> AsyncIterator[Event]:
        """Every event of the run from its start, live, until it finishes."""
        return self._run.log.follow()

    async def result(self) -> RunResult:
        return await self._task

    async def wait(self) -> RunResult:
        """The result; cancelling the waiter cancels the run (after it cleaned up), so the run's task
        never outlives whoever waits for it."""
        try:
            return await asyncio.shield(self._task)
        except asyncio.CancelledError:
            self.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            raise

    def __await__(self) -> Generator[Any, None, RunResult]:
        return self._task.__await__()


class Runtime:
    """Runs workflows on one chat client and one tool registry."""

    def __init__(
        self,
        client: ChatClient | None = None,
        tools: ToolRegistry | None = None,
        *,
        policy: str = FAIL_FAST,
        deadline: float | None = None,
        tracer: Any = None,
    ):
        self.client = client
        self.tools = tools if tools is not None else ToolRegistry()
        self.policy = policy
        self.deadline = deadline
        self.tracer = tracer
        """A loom.tracing.Tracing (anything with `span(name, attributes)`): a span per run and per node,
        current while it runs, so the node's model calls nest under it. None traces nothing."""

    def span(self, name: str, attributes: dict[str, Any]) -> Any:
        return self.tracer.span(name, attributes) if self.tracer is not None else nullcontext()

    def start(
        self,
        workflow: Workflow,
        inputs: Mapping[str, Any] | None = None,
        *,
        policy: str | None = None,
        deadline: float | None = None,
        program_id: str | None = None,
        on_event: EventCallback | None = None,
        completed: Mapping[str, Any] | None = None,
    ) -> RunHandle:
        """Validate, then start the run on the running event loop.

        Everything that can be wrong before running (graph, inputs, tools, missing client) raises
        WorkflowError here, before any node starts. `deadline` is seconds for the whole run.
        `completed` resumes an interrupted run: those nodes' outputs, kept from before, are not run again.
        """
        policy = policy or self.policy
        if policy not in POLICIES:
            raise WorkflowError(f"policy must be one of {POLICIES}, got {policy!r}")
        order = workflow.validate(tools=self.tools)
        resolved = workflow.resolve_inputs(inputs or {})
        if self.client is None:
            needs_model = [n.name for n in workflow.nodes.values() if isinstance(n, LLMNode)]
            if needs_model:
                raise WorkflowError(f"nodes {needs_model} call a model, but the runtime has no client")
        run_id = uuid.uuid4().hex[:12]
        record = RunRecord(run_id, program_id or f"{workflow.name}-{run_id}", workflow.name, time.time())
        for name in order:
            record.nodes[name] = NodeRecord(name, workflow.nodes[name].kind, list(workflow.nodes[name].deps))
        run = _Run(self, workflow, order, resolved, policy, record, EventLog(on_event))
        run.completed = {k: v for k, v in (completed or {}).items() if k in workflow.nodes}
        deadline = deadline if deadline is not None else self.deadline
        return RunHandle(run, asyncio.get_running_loop().create_task(run.execute(deadline)))

    async def run(
        self, workflow: Workflow, inputs: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> RunResult:
        """Start a run and wait for its result (cancelling this coroutine cancels the run)."""
        return await self.start(workflow, inputs, **kwargs).wait()


class _Run:
    """The state of one run, driven by `execute`."""

    def __init__(
        self,
        runtime: Runtime,
        workflow: Workflow,
        order: list[str],
        inputs: dict[str, Any],
        policy: str,
        record: RunRecord,
        log: EventLog,
    ):
        self.runtime = runtime
        self.workflow = workflow
        self.order = order
        self.inputs = inputs
        self.policy = policy
        self.record = record
        self.log = log
        self.cancel_requested = asyncio.Event()
        self.outputs: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}
        self.completed: dict[str, Any] = {}
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def emit(self, kind: str, node: str | None = None, /, **data: Any) -> None:
        self.log.emit(Event(kind, self.now(), node, data))

    async def execute(self, deadline: float | None) -> RunResult:
        attributes = {"loom.run.id": self.record.run_id, "loom.program.id": self.record.program_id}
        with self.runtime.span(f"agent.run {self.workflow.name}", attributes):
            return await self._execute(deadline)

    async def _execute(self, deadline: float | None) -> RunResult:
        self._t0 = time.monotonic()
        self.emit("run_started", program_id=self.record.program_id, nodes=self.order)
        waiting = {name: set(self.workflow.nodes[name].deps) for name in self.order}
        dependents = self.workflow.dependents()
        for name in [n for n in self.order if n in self.completed]:
            del waiting[name]
            self.outputs[name] = self.completed[name]
            self.record.nodes[name].status = "ok"
            self.emit("node_finished", name, output=self.completed[name], attempts=0, resumed=True)
            for child in dependents[name]:
                waiting.get(child, set()).discard(name)
        running: dict[asyncio.Task, str] = {}
        status = "ok"

        def launch_ready() -> None:
            if self.cancel_requested.is_set():
                return
            for name in [n for n, deps in waiting.items() if not deps]:
                del waiting[name]
                running[asyncio.create_task(self._node(name), name=f"node:{name}")] = name

        # Cancelling through the handle is a message to this loop, not a task cancel, so the run
        # always ends with a result (even if cancelled before it started).
        stopper = asyncio.ensure_future(self.cancel_requested.wait())
        try:
            async with asyncio.timeout(deadline):
                launch_ready()
                while running and not self.cancel_requested.is_set():
                    done, _ = await asyncio.wait([*running, stopper], return_when=asyncio.FIRST_COMPLETED)
                    for task in done & running.keys():
                        name = running.pop(task)
                        error = task.exception()
                        if error is None:
                            self.outputs[name] = task.result()
                            for child in dependents[name]:
                                waiting.get(child, set()).discard(name)
                        else:
                            self.errors[name] = error
                            self._skip_downstream(name, dependents, waiting)
                    if self.errors and self.policy == FAIL_FAST:
                        break
                    launch_ready()
            if self.cancel_requested.is_set():
                status = "cancelled"
        except TimeoutError:
            status = "deadline_exceeded"
            logger.warning("run %s passed its deadline of %ss", self.record.run_id, deadline)
        except asyncio.CancelledError:
            # The task itself was cancelled (its awaiter was): clean up, then let the cancel propagate.
            await self._stop(running, waiting)
            self._finish("cancelled")
            raise
        finally:
            stopper.cancel()
        await self._stop(running, waiting)
        if status == "ok" and self.errors:
            status = "failed"
        return self._finish(status)

    def _skip_downstream(
        self, failed: str, dependents: dict[str, list[str]], waiting: dict[str, set[str]]
    ) -> None:
        downstream: set[str] = set()
        stack = list(dependents[failed])
        while stack:
            name = stack.pop()
            if name not in downstream:
                downstream.add(name)
                stack.extend(dependents[name])
        for name in self.order:  # report them in a stable, topological order
            if name in downstream and name in waiting:
                del waiting[name]
                self._mark(name, "skipped", f"upstream node {failed!r} failed")

    def _mark(self, name: str, status: str, why: str) -> None:
        rec = self.record.nodes[name]
        rec.status, rec.error = status, why
        self.emit(f"node_{status}", name, reason=why, status=status)

    async def _stop(self, running: dict[asyncio.Task, str], waiting: dict[str, set[str]]) -> None:
        """Cancel what still runs and mark what never started."""
        for task in running:
            task.cancel()
        results = await asyncio.gather(*running, return_exceptions=True)
        for (task, name), result in zip(running.items(), results, strict=True):
            if task.cancelled() or isinstance(result, asyncio.CancelledError):
                rec = self.record.nodes[name]
                rec.end = self.now()
                if rec.attempts and rec.attempts[-1].end is None:
                    rec.attempts[-1].end = rec.end
                self._mark(name, "cancelled", "the run stopped while the node was running")
            elif isinstance(result, BaseException):
                self.errors[name] = result
            else:
                self.outputs[name] = result
        running.clear()
        for name in waiting:
            self._mark(name, "skipped", "the run stopped before the node could start")
        waiting.clear()

    def _finish(self, status: str) -> RunResult:
        self.record.status = status
        self.record.duration = self.now()
        end_program = getattr(self.runtime.client, "end_program", None)  # optional (see ChatClient)
        if end_program is not None:
            try:
                end_program(self.record.program_id)
            except Exception:  # the run's result matters more than a missed release (pins expire)
                logger.exception("end_program failed for %s", self.record.program_id)
        self.emit("run_finished", status=status, errors={n: str(e) for n, e in self.errors.items()})
        self.log.close()
        nodes = self.record.nodes.values()
        return RunResult(
            status=status,
            outputs=dict(self.outputs),
            errors=dict(self.errors),
            skipped=[n.name for n in nodes if n.status == "skipped"],
            cancelled=[n.name for n in nodes if n.status == "cancelled"],
            record=self.record,
            events=list(self.log.events),
        )

    async def _node(self, name: str) -> Any:
        """All attempts of one node; returns its output or raises its last error."""
        node = self.workflow.nodes[name]
        with self.runtime.span(f"agent.node {name}", {"loom.node.name": name, "loom.node.kind": node.kind}):
            return await self._attempts(name, node)

    async def _attempts(self, name: str, node: Any) -> Any:
        rec = self.record.nodes[name]
        rec.status, rec.start = "running", self.now()
        values = {INPUT: self.inputs, **{dep: self.outputs[dep] for dep in node.deps}}
        ctx = NodeContext(
            node=node,
            values=values,
            client=self.runtime.client,
            tools=self.runtime.tools,
            program_id=self.record.program_id,
            sampling=self.workflow.sampling,
            record=rec,
            emit=lambda kind, data: self.emit(kind, name, **data),
        )
        self.emit("node_started", name, kind=node.kind)
        for attempt in range(node.retries + 1):
            rec.attempts.append(Attempt(self.now()))
            timeout = asyncio.timeout(node.timeout)
            try:
                async with timeout:
                    output = await run_node(ctx)
            except Exception as e:
                error: Exception = e
                if isinstance(e, TimeoutError) and timeout.expired():
                    error = NodeTimeout(
                        f"node {name!r} timed out after {node.timeout} s (attempt {attempt + 1})"
                    )
                rec.attempts[-1].end = self.now()
                rec.attempts[-1].error = f"{type(error).__name__}: {error}"
                if attempt == node.retries or isinstance(error, NOT_RETRIED):
                    rec.status, rec.end, rec.error = "failed", self.now(), rec.attempts[-1].error
                    self.emit("node_failed", name, error=rec.error, attempts=attempt + 1)
                    if error is e:
                        raise
                    raise error from e
                delay = node.backoff * 2**attempt
                self.emit(
                    "node_retrying", name, attempt=attempt + 1, delay=delay, error=rec.attempts[-1].error
                )
                await asyncio.sleep(delay)
                continue
            rec.attempts[-1].end = rec.end = self.now()
            rec.status = "ok"
            self.emit("node_finished", name, output=output, attempts=attempt + 1)
            return output
        raise AssertionError("unreachable: the last attempt returns or raises")
