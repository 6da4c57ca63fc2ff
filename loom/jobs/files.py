"""Files of the OpenAI Files API: uploaded batch inputs and the batch outputs loom writes.

Contents live as plain files under <state-dir>/files, metadata in the `files` table. A file is written
to a temporary name, fsynced and renamed before its row is committed, so a listed file is always whole;
a crash in between leaves an unlisted file that the next start removes.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from loom.errors import InvalidRequest, NotFound, StorageFull
from loom.jobs.db import Database, is_full

logger = logging.getLogger(__name__)

UPLOAD_PURPOSES = ("batch",)
OUTPUT_PURPOSE = "batch_output"


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def file_object(row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
    }


def check_batch_jsonl(data: bytes) -> int:
    """Checks an uploaded batch input: UTF-8 JSON Lines, each an object with a unique string custom_id.
    Returns the number of requests. (Whether a line is a valid request for its endpoint is checked when
    it runs, and reported in the batch's error file.)"""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"the file is not UTF-8 text: {e}", param="file") from None
    seen: dict[str, int] = {}
    count = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise InvalidRequest(
                f"the file is not JSONL: line {number} is not JSON ({e})", param="file"
            ) from None
        if not isinstance(item, dict):
            raise InvalidRequest(f"line {number} is not a JSON object", param="file")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise InvalidRequest(f"line {number} has no custom_id (a non-empty string)", param="file")
        if custom_id in seen:
            raise InvalidRequest(
                f"duplicate custom_id {custom_id!r} on lines {seen[custom_id]} and {number}", param="file"
            )
        seen[custom_id] = number
        count += 1
    if count == 0:
        raise InvalidRequest("the file holds no requests", param="file")
    return count


class FileStore:
    def __init__(self, db: Database, root: Path, max_bytes: int | None = None):
        self.db = db
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        """The quota of the whole state directory (files and database), or None."""
        self._sweep()

    def _sweep(self) -> None:
        """Remove contents without a row (a crash between writing a file and recording it)."""
        known = {Path(r["path"]).name for r in self.db.query("SELECT path FROM files")}
        for path in self.root.iterdir():
            if path.name not in known:
                path.unlink(missing_ok=True)

    def used_bytes(self) -> int:
        stored = self.db.one("SELECT COALESCE(SUM(bytes), 0) AS n FROM files")["n"]
        db_files = [self.db.path, Path(f"{self.db.path}-wal")]
        return stored + sum(p.stat().st_size for p in db_files if p.exists())

    def _write(self, path: Path, data: bytes) -> None:
        if self.max_bytes is not None and self.used_bytes() + len(data) > self.max_bytes:
            raise StorageFull(
                f"storing {len(data)} bytes would pass the state directory's quota of {self.max_bytes} bytes"
            )
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if is_full(e):
                raise StorageFull(f"the file could not be stored under {self.root}: {e}") from e
            raise

    def create(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        """Store an upload; nothing is kept if any step fails."""
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidRequest(
                f"purpose must be one of {UPLOAD_PURPOSES}, got {purpose!r}", param="purpose"
            )
        check_batch_jsonl(data)
        return self._store(new_file_id(), filename, purpose, data)

    def _store(self, file_id: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        path = self.root / file_id
        self._write(path, data)
        try:
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO files (id, purpose, filename, bytes, created_at, path)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (file_id, purpose, filename, len(data), int(time.time()), str(path)),
                )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return self.get(file_id)

    def write_output(self, file_id: str, filename: str, lines: list[str]) -> dict[str, Any]:
        """Write (or rewrite, identically, after a crash) a batch output file under a fixed id."""
        data = "".join(line + "\n" for line in lines).encode()
        return self._store(file_id, filename, OUTPUT_PURPOSE, data)

    def get(self, file_id: str, param: str = "file_id") -> dict[str, Any]:
        row = self.db.one("SELECT * FROM files WHERE id = ?", (file_id,))
        if row is None:
            raise NotFound(f"no file with id {file_id!r}", param=param)
        return file_object(row)

    def content(self, file_id: str, param: str = "file_id") -> bytes:
        row = self.db.one("SELECT path FROM files WHERE id = ?", (file_id,))
        if row is None:
            raise NotFound(f"no file with id {file_id!r}", param=param)
        return Path(row["path"]).read_bytes()

    def list(self, purpose: str | None = None, limit: int = 10_000) -> list[dict[str, Any]]:
        if purpose is None:
            rows = self.db.query("SELECT * FROM files ORDER BY created_at DESC, id LIMIT ?", (limit,))
        else:
            rows = self.db.query(
                "SELECT * FROM files WHERE purpose = ? ORDER BY created_at DESC, id LIMIT ?", (purpose, limit)
            )
        return [file_object(r) for r in rows]

    def delete(self, file_id: str) -> dict[str, Any]:
        row = self.db.one("SELECT path FROM files WHERE id = ?", (file_id,))
        if row is None:
            raise NotFound(f"no file with id {file_id!r}", param="file_id")
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        Path(row["path"]).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}
