"""The SQLite database under --state-dir: one file in WAL mode, opened by the server's event loop thread.

WAL lets readers run beside the one writer, and a commit is durable once it returns (synchronous=FULL:
a batch line recorded as done survives a SIGKILL or a power cut the next instant). Every write goes
through `transaction()`, so a failure (a full disk included) rolls back whole: nothing half-stored.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loom.errors import StorageFull

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    data TEXT NOT NULL,          -- the OpenAI batch object as JSON (status, counts, timestamps, ...)
    status TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,         -- "<group>:<line>"
    grp TEXT NOT NULL,           -- the batch (or other job) the task belongs to
    seq INTEGER NOT NULL,        -- order within the group
    payload TEXT NOT NULL,
    state TEXT NOT NULL,         -- ready | claimed | done | dropped
    consumer TEXT,
    claimed_at REAL,
    result TEXT
);
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (state, grp, seq);
CREATE TABLE IF NOT EXISTS agent_runs (
    id TEXT PRIMARY KEY,
    workflow TEXT NOT NULL,      -- the workflow as JSON (its dict form)
    inputs TEXT NOT NULL,
    options TEXT NOT NULL,
    status TEXT NOT NULL,        -- queued | running | ok | failed | cancelled | deadline_exceeded
    incarnation INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    finished_at INTEGER,
    error TEXT
);
CREATE TABLE IF NOT EXISTS agent_nodes (
    run_id TEXT NOT NULL,
    node TEXT NOT NULL,
    status TEXT NOT NULL,
    output TEXT,
    error TEXT,
    PRIMARY KEY (run_id, node)
);
CREATE TABLE IF NOT EXISTS agent_events (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    incarnation INTEGER NOT NULL,
    kind TEXT NOT NULL,
    node TEXT,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""


def is_full(error: BaseException) -> bool:
    """Whether an error means the disk (or the database's page quota) is full."""
    if isinstance(error, sqlite3.OperationalError):
        return "full" in str(error)  # SQLITE_FULL: "database or disk is full"
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class Database:
    """One SQLite connection, used from one thread (the server's event loop)."""

    def __init__(self, path: str | Path, max_bytes: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly one `with`.
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        if max_bytes is not None:
            page = self.conn.execute("PRAGMA page_size").fetchone()[0]
            self.conn.execute(f"PRAGMA max_page_count={max(16, max_bytes // page)}")
        self.conn.executescript(SCHEMA)  # idempotent (IF NOT EXISTS); runs outside any transaction

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE .. COMMIT, or ROLLBACK on any error; a full disk becomes StorageFull."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite rolls back by itself after some errors (a full disk)
                    conn.execute("ROLLBACK")
                raise
        except (sqlite3.OperationalError, OSError) as e:
            if is_full(e):
                raise StorageFull(f"the job state under {self.path.parent} could not be written: {e}") from e
            raise

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, args).fetchall()

    def one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        return self.conn.execute(sql, args).fetchone()

    def close(self) -> None:
        self.conn.close()
