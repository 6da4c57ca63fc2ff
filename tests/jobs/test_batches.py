"""BatchStore on a real SQLite state directory: a full database rolls a batch back whole, and a batch
whose lines were all answered before a crash is finalized by the next process (the crash windows
between recording answers and writing the output)."""

from __future__ import annotations

import pytest

from loom.errors import StorageFull
from loom.jobs.batches import BatchStore
from loom.jobs.db import Database
from loom.jobs.files import FileStore
from loom.jobs.queue import SQLiteQueue
from tests.jobs.conftest import chat_line, jsonl, read_jsonl


def store(path, max_bytes=None) -> BatchStore:
    db = Database(path / "loom.db", max_bytes=max_bytes)
    return BatchStore(db, FileStore(db, path / "files"), SQLiteQueue(db))


def test_a_full_database_stores_nothing_of_the_batch(tmp_path):
    big = jsonl([chat_line(f"l{i}", "w" * 4000) for i in range(200)])  # ~800 KB of task payloads
    seeded = store(tmp_path)
    file_id = seeded.files.create("big.jsonl", "batch", big)["id"]
    seeded.db.close()
    full = store(tmp_path, max_bytes=256 * 1024)  # the database may not grow past 256 KiB
    with pytest.raises(StorageFull, match="could not be written"):
        full.create(file_id, "/v1/chat/completions")
    assert full.db.query("SELECT * FROM batches") == [] and full.db.query("SELECT * FROM tasks") == []
    small = full.files.create("s.jsonl", "batch", jsonl([chat_line("s", "hi")]))["id"]
    assert full.create(small, "/v1/chat/completions")["status"] == "in_progress", "still writable after"


def test_answers_recorded_before_a_crash_are_finalized_by_the_next_process(tmp_path):
    before = store(tmp_path)
    lines = [chat_line(f"c{i}", f"q{i}") for i in range(3)]
    batch = before.create(
        before.files.create("in.jsonl", "batch", jsonl(lines))["id"], "/v1/chat/completions"
    )
    for task in before.queue.claim("worker", 10):
        before.queue.finish(task, {"ok": True, "status_code": 200, "body": {"n": task.seq}})
    before.db.close()  # the process dies here: every answer recorded, no output written
    after = store(tmp_path)
    after.resume()
    after.tick(in_flight=set())
    done = after.get(batch["id"])
    assert done["status"] == "completed" and done["request_counts"] == {
        "total": 3,
        "completed": 3,
        "failed": 0,
    }
    output = read_jsonl(after.files.content(done["output_file_id"]).decode())
    assert [(o["custom_id"], o["response"]["body"]) for o in output] == [
        (f"c{i}", {"n": i}) for i in range(3)
    ]
