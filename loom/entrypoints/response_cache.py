"""Response cache: a repeated deterministic request is answered from memory without running the model.

Only deterministic requests are cached (temperature 0, or a fixed seed), keyed on the whole normalized
request (model, messages or prompt, every sampling field with its default applied), and only complete
answers are stored: never an error, never an answer cut short by a disconnect. Bounded in bytes (LRU)
with a TTL. The interface is small so a shared backend (e.g. Redis for several replicas) can stand in.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

# Fields that do not change the answer: how it is delivered, who asked, and cache control itself.
NON_SEMANTIC_FIELDS = frozenset(
    {"stream", "stream_options", "user", "cache", "request_id", "metadata", "store"}
)
CACHEABLE_FINISH_REASONS = frozenset({"stop", "length", "tool_calls"})


def cache_key(endpoint: str, request: dict) -> str | None:
    """The key of a normalized request (field defaults already applied), or None if not deterministic."""
    temperature = request.get("temperature")
    if temperature is None:
        temperature = 1.0
    if temperature > 0 and request.get("seed") is None:
        return None
    body = {k: v for k, v in request.items() if k not in NON_SEMANTIC_FIELDS}
    blob = json.dumps([endpoint, body], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cacheable(response: dict) -> bool:
    """Whether a finished response may be stored: every choice ended normally."""
    choices = response.get("choices") or []
    return bool(choices) and all(c.get("finish_reason") in CACHEABLE_FINISH_REASONS for c in choices)


class ResponseCache(Protocol):
    def get(self, key: str) -> dict | None: ...

    def put(self, key: str, response: dict) -> bool: ...


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes: int = 0
    entries: int = 0
    evictions: int = 0


class InMemoryResponseCache:
    """LRU by bytes with a TTL. Thread-safe (handlers may run on several threads)."""

    def __init__(self, max_bytes: int = 64 * 2**20, ttl_s: float = 600.0, clock=time.monotonic):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, int, str]] = OrderedDict()  # key -> (expiry, size, json)
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def get(self, key: str) -> dict | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] < self.clock():
                self._drop(key)
                entry = None
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return json.loads(entry[2])

    def put(self, key: str, response: dict) -> bool:
        """Store a response; returns False if it is not cacheable or larger than the whole cache."""
        if not cacheable(response):
            return False
        blob = json.dumps(response, separators=(",", ":"))
        size = len(blob.encode())
        if size > self.max_bytes:
            return False
        with self._lock:
            if key in self._entries:
                self._drop(key)
            while self.stats.bytes + size > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.stats.evictions += 1
            self._entries[key] = (self.clock() + self.ttl_s, size, blob)
            self.stats.bytes += size
            self.stats.entries = len(self._entries)
        return True

    def _drop(self, key: str) -> None:
        _, size, _ = self._entries.pop(key)
        self.stats.bytes -= size
        self.stats.entries = len(self._entries)
