from __future__ import annotations

from loom.entrypoints.response_cache import InMemoryResponseCache, cache_key


def response(text: str, finish: str = "stop") -> dict:
    return {"id": "x", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def test_key_only_for_deterministic_requests():
    base = {"model": "m", "prompt": "hi", "max_tokens": 5}
    assert cache_key("completions", {**base, "temperature": 0}) is not None
    assert cache_key("completions", {**base, "temperature": 0.7, "seed": 3}) is not None
    assert cache_key("completions", {**base, "temperature": 0.7}) is None
    assert cache_key("completions", base) is None  # OpenAI's default temperature is 1


def test_key_ignores_delivery_fields_but_not_sampling_fields():
    a = {"model": "m", "prompt": "hi", "temperature": 0, "max_tokens": 5}
    assert cache_key("c", a) == cache_key("c", {**a, "stream": True, "user": "bob", "cache": True})
    assert cache_key("c", a) != cache_key("c", {**a, "max_tokens": 6})
    assert cache_key("c", a) != cache_key("c", {**a, "top_k": 3})
    assert cache_key("c", a) != cache_key("chat", a)


def test_lru_by_bytes():
    first = response("a" * 100)
    size = len(__import__("json").dumps(first, separators=(",", ":")))
    cache = InMemoryResponseCache(max_bytes=2 * size + 10)
    assert cache.put("k1", first) and cache.put("k2", response("b" * 100))
    assert cache.get("k1") is not None  # k1 is now the most recent
    assert cache.put("k3", response("c" * 100))
    assert cache.get("k2") is None and cache.get("k1") is not None and cache.get("k3") is not None
    assert cache.stats.bytes <= cache.max_bytes and cache.stats.evictions == 1
    assert not cache.put("huge", response("d" * 10_000))


def test_ttl_expires_entries():
    now = [0.0]
    cache = InMemoryResponseCache(ttl_s=10, clock=lambda: now[0])
    cache.put("k", response("x"))
    now[0] = 9.9
    assert cache.get("k") is not None
    now[0] = 10.1
    assert cache.get("k") is None and cache.stats.entries == 0 and cache.stats.bytes == 0


def test_never_stores_incomplete_answers():
    cache = InMemoryResponseCache()
    assert not cache.put("k", response("x", finish="abort"))
    assert not cache.put("k", response("x", finish=None))
    assert not cache.put("k", {"error": {"message": "bad"}})
    assert cache.get("k") is None and cache.stats.misses == 1
