"""The durable work queue: tasks in groups (a batch's lines), claimed by consumers, answered exactly once.

Delivery is at least once; answers are exactly once. A consumer claims tasks, runs them and calls
`finish(task, result)`, which records the result only if none is recorded yet and then acknowledges the
task. A consumer that dies holding claims loses them: after `stale_after_s` (or at once, for its own
claims, when it comes back under the same name) they are handed out again. So a task whose work was done
but whose result never got recorded runs again, and one recorded twice keeps its first result.

Two backends share this interface: `SQLiteQueue` (the embedded default, in the server's state database)
and `RedisQueue` (loom/jobs/redis_queue.py: Redis Streams, for several servers sharing work).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

from loom.jobs.db import Database


@dataclass(frozen=True, slots=True)
class Task:
    """One unit of work: `id` is unique across groups ("<group>:<seq>")."""

    id: str
    group: str
    seq: int
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class GroupCounts:
    total: int
    done: int
    """Tasks with a recorded result."""
    failed: int
    """Done tasks whose result says `"ok": false`."""
    pending: int
    """Tasks not done and not dropped (ready or claimed)."""


class WorkQueue(Protocol):
    """What the batch runner needs from a queue. Every method is quick (no waiting on work)."""

    def put(self, tasks: list[Task]) -> None:
        """Add tasks (a task whose id is already queued is not added again)."""

    def claim(self, consumer: str, max_count: int) -> list[Task]:
        """Up to max_count tasks for this consumer: its own claims left over from an earlier life first,
        then stale claims of other consumers, then ready ones, in group and seq order."""

    def finish(self, task: Task, result: dict[str, Any]) -> bool:
        """Record the task's result unless one is recorded already, and acknowledge it. Returns whether
        this call recorded it."""

    def release(self, task: Task) -> None:
        """Give a claimed task back unanswered (shutting down, or told to retry later)."""

    def drop(self, group: str) -> int:
        """Drop the group's tasks that are not done and not running (cancel); returns how many."""

    def results(self, group: str) -> dict[int, dict[str, Any]]:
        """seq -> recorded result, for every done task of the group."""

    def counts(self, group: str) -> GroupCounts: ...

    def forget(self, group: str) -> None:
        """Delete the group's tasks and results (its output has been written)."""

    def close(self) -> None: ...


class SQLiteQueue:
    """The queue as a table in the server's own SQLite database.

    One server owns a state directory, so a claim still marked at startup belongs to a process that
    died; `claim` hands those back to whoever asks, as it does claims older than stale_after_s.
    """

    def __init__(self, db: Database, stale_after_s: float = 600.0):
        self.db = db
        self.stale_after_s = stale_after_s
        self._started = time.time()

    def put(self, tasks: list[Task]) -> None:
        with self.db.transaction() as conn:
            self.put_in(conn, tasks)

    @staticmethod
    def put_in(conn, tasks: list[Task]) -> None:
        """Insert inside the caller's transaction (a batch and its lines are stored together or not)."""
        conn.executemany(
            "INSERT OR IGNORE INTO tasks (id, grp, seq, payload, state) VALUES (?, ?, ?, ?, 'ready')",
            [(t.id, t.group, t.seq, json.dumps(t.payload)) for t in tasks],
        )

    def claim(self, consumer: str, max_count: int) -> list[Task]:
        if max_count <= 0:
            return []
        now = time.time()
        # Claims made before this process started are a dead process's; others expire when stale.
        stale_before = (
            max(self._started, now - self.stale_after_s) if self.stale_after_s > 0 else self._started
        )
        with self.db.transaction() as conn:
            rows = conn.execute(
                "UPDATE tasks SET state = 'claimed', consumer = ?, claimed_at = ? WHERE id IN ("
                " SELECT id FROM tasks WHERE state = 'ready' OR (state = 'claimed' AND claimed_at < ?)"
                " ORDER BY grp, seq LIMIT ?) RETURNING id, grp, seq, payload",
                (consumer, now, stale_before, max_count),
            ).fetchall()
        tasks = [Task(r["id"], r["grp"], r["seq"], json.loads(r["payload"])) for r in rows]
        return sorted(tasks, key=lambda t: (t.group, t.seq))

    def finish(self, task: Task, result: dict[str, Any]) -> bool:
        with self.db.transaction() as conn:
            cur = conn.execute(
                "UPDATE tasks SET state = 'done', result = ? WHERE id = ? AND state IN ('ready', 'claimed')",
                (json.dumps(result), task.id),
            )
        return cur.rowcount == 1

    def release(self, task: Task) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE tasks SET state = 'ready', consumer = NULL WHERE id = ? AND state = 'claimed'",
                (task.id,),
            )

    def drop(self, group: str) -> int:
        with self.db.transaction() as conn:
            # Lines running now finish and are recorded: a cancelled batch keeps the answers it has.
            cur = conn.execute(
                "UPDATE tasks SET state = 'dropped' WHERE grp = ? AND state = 'ready'", (group,)
            )
        return cur.rowcount

    def results(self, group: str) -> dict[int, dict[str, Any]]:
        rows = self.db.query("SELECT seq, result FROM tasks WHERE grp = ? AND state = 'done'", (group,))
        return {r["seq"]: json.loads(r["result"]) for r in rows}

    def counts(self, group: str) -> GroupCounts:
        rows = self.db.query("SELECT state, COUNT(*) AS n FROM tasks WHERE grp = ? GROUP BY state", (group,))
        by_state = {r["state"]: r["n"] for r in rows}
        failed = self.db.one(
            "SELECT COUNT(*) AS n FROM tasks WHERE grp = ? AND state = 'done'"
            " AND json_extract(result, '$.ok') = 0",
            (group,),
        )["n"]
        return GroupCounts(
            total=sum(by_state.values()),
            done=by_state.get("done", 0),
            failed=failed,
            pending=by_state.get("ready", 0) + by_state.get("claimed", 0),
        )

    def forget(self, group: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM tasks WHERE grp = ?", (group,))

    def close(self) -> None:
        pass  # the database belongs to the caller
