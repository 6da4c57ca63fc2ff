"""Batches of the OpenAI Batch API: their lifecycle, and the output files built from the queue's results.

validating -> in_progress -> finalizing -> completed, or -> cancelling -> cancelled, or -> expired
(the completion window passed first). `failed` is a batch whose input could not be read when it started.

Crash safety comes from the order of the steps, each of them durable before the next:
1. create: the batch row and (with the SQLite queue) all its tasks commit in one transaction; with Redis
   the row commits as `validating` first and a restart queues the lines again (idempotently).
2. a line's result is recorded in the queue before its task is acknowledged; a line run but not recorded
   runs again (greedy requests give the same answer), a line recorded twice keeps its first answer.
3. finalize builds the output and error files from the recorded results, one line per custom_id, under
   ids fixed by the batch id, then commits the batch's final status; a crash before that commit finalizes
   again on restart and rewrites the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from typing import Any

from loom.errors import InvalidRequest, NotFound
from loom.jobs.db import Database
from loom.jobs.files import FileStore
from loom.jobs.queue import SQLiteQueue, Task, WorkQueue

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
TERMINAL = ("completed", "failed", "expired", "cancelled")
_WINDOW = re.compile(r"([1-9][0-9]*)(s|m|h)")
_UNITS = {"s": 1, "m": 60, "h": 3600}


def window_seconds(window: str) -> int:
    """`24h` as in OpenAI's API; loom also takes other whole numbers of hours, minutes or seconds."""
    match = _WINDOW.fullmatch(window or "")
    if match is None:
        raise InvalidRequest(
            f"completion_window must look like '24h' (or N s|m|h), got {window!r}", param="completion_window"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


def output_line(custom_id: str, task_id: str, result: dict[str, Any] | None, missing: str) -> str:
    """One line of an output or error file, in OpenAI's format. `result` None: the line never ran
    (`missing` is the error code: batch_cancelled or batch_expired)."""
    line_id = "batch_req_" + hashlib.sha256(task_id.encode()).hexdigest()[:24]
    if result is None:
        error = {"code": missing, "message": f"the request did not run: {missing.replace('_', ' ')}"}
        return json.dumps({"id": line_id, "custom_id": custom_id, "response": None, "error": error})
    response = None
    if result.get("status_code") is not None:
        response = {
            "status_code": result["status_code"],
            "request_id": result.get("request_id") or line_id,
            "body": result.get("body"),
        }
    return json.dumps(
        {"id": line_id, "custom_id": custom_id, "response": response, "error": result.get("error")}
    )


class BatchStore:
    """Batches in the state database; lines in the work queue."""

    def __init__(self, db: Database, files: FileStore, queue: WorkQueue):
        self.db = db
        self.files = files
        self.queue = queue

    # ---- the API's operations --------------------------------------------------------------------

    def create(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        if endpoint not in ENDPOINTS:
            raise InvalidRequest(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}", param="endpoint")
        window = window_seconds(completion_window)
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            raise InvalidRequest("metadata must map strings to strings", param="metadata")
        info = self.files.get(input_file_id, param="input_file_id")
        if info["purpose"] != "batch":
            raise InvalidRequest(
                f"file {input_file_id!r} has purpose {info['purpose']!r}, not 'batch'", param="input_file_id"
            )
        lines = self._lines(input_file_id)
        now = int(time.time())
        batch_id = f"batch_{uuid.uuid4().hex}"
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + window,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        tasks = self._tasks(batch_id, endpoint, lines)
        sqlite = isinstance(self.queue, SQLiteQueue)
        if sqlite:
            batch.update(status="in_progress", in_progress_at=now)
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO batches (id, data, status, expires_at, created_at) VALUES (?, ?, ?, ?, ?)",
                (batch_id, json.dumps(batch), batch["status"], batch["expires_at"], now),
            )
            if sqlite:
                SQLiteQueue.put_in(conn, tasks)
        if not sqlite:
            self._enqueue(batch, tasks)
        return batch

    def get(self, batch_id: str) -> dict[str, Any]:
        row = self.db.one("SELECT data FROM batches WHERE id = ?", (batch_id,))
        if row is None:
            raise NotFound(f"no batch with id {batch_id!r}", param="batch_id")
        return json.loads(row["data"])

    def list(self, after: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.db.query("SELECT id, data FROM batches ORDER BY created_at DESC, id DESC")
        batches = [json.loads(r["data"]) for r in rows]
        if after is not None:
            ids = [b["id"] for b in batches]
            if after not in ids:
                raise NotFound(f"no batch with id {after!r}", param="after")
            batches = batches[ids.index(after) + 1 :]
        return batches[:limit]

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Stop starting the batch's lines; the batch becomes `cancelled` once its running lines end.
        Cancelling a batch that has ended already changes nothing."""
        batch = self.get(batch_id)
        if batch["status"] in TERMINAL or batch["status"] == "cancelling":
            return batch
        self.queue.drop(batch_id)
        batch.update(status="cancelling", cancelling_at=int(time.time()))
        self._save(batch)
        return batch

    # ---- progress, called by the runner's loop ----------------------------------------------------

    def resume(self) -> None:
        """At start: queue the lines of batches a crash left in `validating`; forget the queued work of
        batches that ended (a crash between writing their output and clearing the queue)."""
        for row in self.db.query("SELECT data FROM batches WHERE status = 'validating'"):
            batch = json.loads(row["data"])
            try:
                lines = self._lines(batch["input_file_id"])
            except NotFound:
                self._fail(batch, "the input file was deleted before the batch started")
                continue
            self._enqueue(batch, self._tasks(batch["id"], batch["endpoint"], lines))
        if isinstance(self.queue, SQLiteQueue):
            with self.db.transaction() as conn:
                conn.execute(
                    "DELETE FROM tasks WHERE grp IN (SELECT id FROM batches WHERE status IN (?, ?, ?, ?))",
                    TERMINAL,
                )

    def uses_file(self, file_id: str) -> str | None:
        """The id of an open batch reading this file, if any."""
        for batch in self.open_batches():
            if batch["input_file_id"] == file_id:
                return batch["id"]
        return None

    def open_batches(self) -> list[dict[str, Any]]:
        rows = self.db.query("SELECT data FROM batches WHERE status NOT IN (?, ?, ?, ?)", TERMINAL)
        return [json.loads(r["data"]) for r in rows]

    def tick(self, in_flight: set[str]) -> None:
        """Update counts; finalize batches whose lines are all answered, expired or (when none of their
        lines is still running here) cancelled. `in_flight`: batch ids with lines running now."""
        now = int(time.time())
        for batch in self.open_batches():
            if batch["status"] == "validating":
                continue
            counts = self.queue.counts(batch["id"])
            rc = {"total": batch["request_counts"]["total"], "completed": counts.done - counts.failed}
            rc["failed"] = counts.failed
            if rc != batch["request_counts"]:
                batch["request_counts"] = rc
                self._save(batch)
            if batch["status"] == "cancelling":
                if batch["id"] not in in_flight:
                    self.finalize(batch, "cancelled")
            elif counts.pending == 0:
                self.finalize(batch, "completed")
            elif now >= batch["expires_at"]:
                self.queue.drop(batch["id"])
                self.finalize(batch, "expired")

    def finalize(self, batch: dict[str, Any], status: str) -> dict[str, Any]:
        """Write the output and error files from the recorded results, then commit the final status."""
        batch_id = batch["id"]
        batch.update(status="finalizing", finalizing_at=batch.get("finalizing_at") or int(time.time()))
        results = self.queue.results(batch_id)
        missing = {"cancelled": "batch_cancelled", "expired": "batch_expired"}.get(status, "batch_failed")
        outputs, errors = [], []
        completed = failed = 0
        for seq, line in enumerate(self._lines(batch["input_file_id"])):
            result = results.get(seq)
            text = output_line(line["custom_id"], f"{batch_id}:{seq}", result, missing)
            if result is not None and result.get("ok"):
                outputs.append(text)
                completed += 1
            else:
                errors.append(text)
                failed += result is not None
        if outputs:
            batch["output_file_id"] = self.files.write_output(
                f"file-{batch_id}-output", f"{batch_id}_output.jsonl", outputs
            )["id"]
        if errors:
            batch["error_file_id"] = self.files.write_output(
                f"file-{batch_id}-errors", f"{batch_id}_errors.jsonl", errors
            )["id"]
        batch["request_counts"] = {
            "total": len(outputs) + len(errors),
            "completed": completed,
            "failed": failed,
        }
        batch.update(status=status, **{f"{status}_at": int(time.time())})
        self._save(batch)
        self.queue.forget(batch_id)
        logger.info("batch %s %s: %d ok, %d failed", batch_id, status, completed, len(errors))
        return batch

    # ---- helpers ---------------------------------------------------------------------------------

    def _lines(self, file_id: str) -> list[dict[str, Any]]:
        text = self.files.content(file_id, param="input_file_id").decode("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    @staticmethod
    def _tasks(batch_id: str, endpoint: str, lines: list[dict[str, Any]]) -> list[Task]:
        return [
            Task(f"{batch_id}:{seq}", batch_id, seq, {"endpoint": endpoint, "line": line})
            for seq, line in enumerate(lines)
        ]

    def _enqueue(self, batch: dict[str, Any], tasks: list[Task]) -> None:
        self.queue.put(tasks)
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        self._save(batch)

    def _fail(self, batch: dict[str, Any], why: str) -> None:
        batch.update(
            status="failed",
            failed_at=int(time.time()),
            errors={"object": "list", "data": [{"code": "invalid_input", "message": why}]},
        )
        self._save(batch)

    def _save(self, batch: dict[str, Any]) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE batches SET data = ?, status = ? WHERE id = ?",
                (json.dumps(batch), batch["status"], batch["id"]),
            )
