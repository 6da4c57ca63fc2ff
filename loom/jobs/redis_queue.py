"""The work queue on Redis Streams, for several servers sharing batch work.

Tasks are entries of one stream read through one consumer group: each server is a consumer (a stable
name, so after a restart it first takes back the entries it held), XACK acknowledges an answered task,
and XAUTOCLAIM hands entries idle for longer than stale_after_s (their consumer died) to a live one.
Results go to one hash per group with HSETNX, so the first answer wins and a task run twice is recorded
once; a task is acknowledged only after its result is stored. A dropped (cancelled) group is a key that
claimers check: its entries are acknowledged without running.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from loom.jobs.queue import GroupCounts, Task

logger = logging.getLogger(__name__)

GROUP = "loom"


class RedisQueue:
    def __init__(self, url: str, prefix: str = "loom:jobs", stale_after_s: float = 600.0):
        import redis  # optional dependency: only servers given a redis:// queue need it

        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.prefix = prefix
        self.stream = f"{prefix}:tasks"
        self.stale_after_ms = int(stale_after_s * 1000)
        self._recovered: set[str] = set()
        self._entries: dict[str, str] = {}
        """Task id -> the stream entry this process holds for it (to acknowledge)."""
        try:
            self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):  # the group exists already: another server made it
                raise

    def _key(self, kind: str, group: str) -> str:
        return f"{self.prefix}:{kind}:{group}"

    def put(self, tasks: list[Task]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for t in tasks:
            # The set of ids ever queued makes put idempotent: a batch re-queued after a crash between
            # storing it and queueing all its lines adds only what is missing.
            pipe.sadd(self._key("queued", t.group), t.id)
        added = pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for t, new in zip(tasks, added, strict=True):
            if new:
                pipe.xadd(
                    self.stream,
                    {"id": t.id, "group": t.group, "seq": t.seq, "payload": json.dumps(t.payload)},
                )
            pipe.hsetnx(self._key("total", t.group), t.id, 1)
        pipe.execute()

    def _tasks(self, entries: list) -> list[Task]:
        tasks, dead = [], []
        for entry_id, fields in entries:
            if not fields:  # deleted from the stream while pending
                dead.append(entry_id)
                continue
            group = fields["group"]
            if self.redis.exists(self._key("dropped", group)) or self.redis.hexists(
                self._key("results", group), fields["id"]
            ):
                dead.append(entry_id)  # cancelled, or answered by a consumer that died before XACK
                continue
            task = Task(fields["id"], group, int(fields["seq"]), json.loads(fields["payload"]))
            self._entries[task.id] = entry_id
            tasks.append(task)
        if dead:
            self.redis.xack(self.stream, GROUP, *dead)
        return tasks

    def claim(self, consumer: str, max_count: int) -> list[Task]:
        if max_count <= 0:
            return []
        tasks: list[Task] = []
        if consumer not in self._recovered:
            # Entries this consumer held when its process died: its pending list, read from id 0.
            self._recovered.add(consumer)
            reply = self.redis.xreadgroup(GROUP, consumer, {self.stream: "0"}, count=10_000)
            for _, entries in reply or []:
                tasks += self._tasks(entries)
        if len(tasks) < max_count and self.stale_after_ms > 0:
            _, entries, *_ = self.redis.xautoclaim(
                self.stream, GROUP, consumer, self.stale_after_ms, "0-0", count=max_count - len(tasks)
            )
            tasks += self._tasks(entries)
        if len(tasks) < max_count:
            reply = self.redis.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=max_count - len(tasks))
            for _, entries in reply or []:
                tasks += self._tasks(entries)
        return tasks

    def finish(self, task: Task, result: dict[str, Any]) -> bool:
        recorded = bool(self.redis.hsetnx(self._key("results", task.group), task.id, json.dumps(result)))
        if recorded and not result.get("ok", True):
            self.redis.incr(self._key("failed", task.group))
        self._ack(task)
        return recorded

    def _ack(self, task: Task) -> None:
        entry = self._entries.pop(task.id, None)
        if entry is not None:
            self.redis.xack(self.stream, GROUP, entry)
            self.redis.xdel(self.stream, entry)

    def release(self, task: Task) -> None:
        # Redis has no "unclaim": re-add the task and acknowledge the held entry.
        entry = self._entries.pop(task.id, None)
        fields = {"id": task.id, "group": task.group, "seq": task.seq, "payload": json.dumps(task.payload)}
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.stream, fields)
        if entry is not None:
            pipe.xack(self.stream, GROUP, entry)
            pipe.xdel(self.stream, entry)
        pipe.execute()

    def drop(self, group: str) -> int:
        self.redis.set(self._key("dropped", group), 1)
        counts = self.counts(group)
        return counts.total - counts.done

    def results(self, group: str) -> dict[int, dict[str, Any]]:
        raw = self.redis.hgetall(self._key("results", group))
        return {int(task_id.rsplit(":", 1)[1]): json.loads(value) for task_id, value in raw.items()}

    def counts(self, group: str) -> GroupCounts:
        total = self.redis.hlen(self._key("total", group))
        done = self.redis.hlen(self._key("results", group))
        failed = int(self.redis.get(self._key("failed", group)) or 0)
        dropped = self.redis.exists(self._key("dropped", group))
        return GroupCounts(total=total, done=done, failed=failed, pending=0 if dropped else total - done)

    def forget(self, group: str) -> None:
        self.redis.delete(*(self._key(k, group) for k in ("queued", "total", "results", "failed", "dropped")))

    def close(self) -> None:
        self.redis.close()
