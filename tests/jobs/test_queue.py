"""The work queue's contract, against both backends: SQLite (the embedded default) and Redis Streams
(a real redis-server). At-least-once delivery, exactly-once results, claims of dead consumers handed
out again, cancelled groups skipped."""

from __future__ import annotations

import time
import uuid

import pytest

from loom.jobs.db import Database
from loom.jobs.queue import SQLiteQueue, Task
from loom.jobs.redis_queue import RedisQueue


def tasks(group: str, n: int) -> list[Task]:
    return [Task(f"{group}:{i}", group, i, {"n": i}) for i in range(n)]


@pytest.fixture(params=["sqlite", "redis"])
def make_queue(request, tmp_path):
    """make_queue(stale_after_s) -> a fresh queue; for SQLite, make_queue(reopen=True) is a new process
    on the same database (a restart)."""
    made = []
    prefix = f"test:{uuid.uuid4().hex}"

    def make(stale_after_s: float = 600.0):
        if request.param == "sqlite":
            queue = SQLiteQueue(Database(tmp_path / "q.db"), stale_after_s)
        else:
            queue = RedisQueue(
                request.getfixturevalue("redis_url"), prefix=prefix, stale_after_s=stale_after_s
            )
        made.append(queue)
        return queue

    yield make
    for queue in made:
        queue.close()


def test_each_task_claimed_once_and_answered_once(make_queue):
    q = make_queue()
    q.put(tasks("g", 5))
    q.put(tasks("g", 5))  # queued again (a restart re-queueing a batch): not duplicated
    first = q.claim("a", 3)
    second = q.claim("b", 10)
    assert [t.seq for t in first] == [0, 1, 2]
    assert [t.seq for t in second] == [3, 4]
    assert q.claim("c", 10) == []
    for t in first + second:
        assert q.finish(t, {"ok": t.seq != 4, "v": t.seq})
    assert not q.finish(first[0], {"ok": True, "v": "again"}), "a second answer must not replace the first"
    assert q.results("g") == {i: {"ok": i != 4, "v": i} for i in range(5)}
    counts = q.counts("g")
    assert (counts.total, counts.done, counts.failed, counts.pending) == (5, 5, 1, 0)


def test_stale_claims_of_a_dead_consumer_are_handed_out_again(make_queue):
    q = make_queue(stale_after_s=0.3)
    q.put(tasks("g", 3))
    held = q.claim("dead", 2)  # this consumer never answers
    (third,) = q.claim("live", 5)
    assert third.seq == 2
    assert q.finish(third, {"ok": True, "by": "live"})
    time.sleep(0.5)
    taken = q.claim("live", 5)
    assert sorted(t.seq for t in taken) == [0, 1]
    for t in taken:
        assert q.finish(t, {"ok": True, "by": "live"})
    # The dead consumer wakes up late: its answers are not recorded a second time.
    assert not any(q.finish(t, {"ok": True, "by": "dead"}) for t in held)
    assert {r["by"] for seq, r in q.results("g").items() if seq < 2} == {"live"}


def test_released_tasks_run_again_and_dropped_groups_do_not(make_queue):
    q = make_queue()
    q.put(tasks("keep", 2) + tasks("drop", 3))
    first = q.claim("a", 1)
    q.release(first[0])
    q.drop("drop")
    seen = []
    while claimed := q.claim("a", 10):
        for t in claimed:
            seen.append(t.id)
            q.finish(t, {"ok": True})
    assert sorted(seen) == ["keep:0", "keep:1"]
    assert q.counts("drop").pending == 0
    q.forget("keep")
    assert q.results("keep") == {} and q.counts("keep").total == 0


def test_sqlite_claims_of_a_killed_process_return_at_restart(tmp_path):
    db_path = tmp_path / "q.db"
    before = SQLiteQueue(Database(db_path))
    before.put(tasks("g", 3))
    assert len(before.claim("server", 2)) == 2  # then the process dies (no release, no answer)
    time.sleep(0.01)
    after = SQLiteQueue(Database(db_path))  # the restarted server, long before stale_after_s
    assert sorted(t.seq for t in after.claim("server", 10)) == [0, 1, 2]


def test_redis_consumer_takes_back_its_own_entries_after_restart(redis_url):
    prefix = f"test:{uuid.uuid4().hex}"
    before = RedisQueue(redis_url, prefix=prefix)
    before.put(tasks("g", 3))
    assert len(before.claim("server-1", 2)) == 2  # dies holding two entries (in its pending list)
    other = RedisQueue(redis_url, prefix=prefix)
    assert [t.seq for t in other.claim("server-2", 10)] == [2], (
        "entries held by a live-looking consumer stay put"
    )
    after = RedisQueue(redis_url, prefix=prefix)  # server-1 restarted under its stable name
    assert sorted(t.seq for t in after.claim("server-1", 10)) == [0, 1]
    for q in (before, other, after):
        q.close()
