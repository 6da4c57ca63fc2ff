"""The server's response-cache and truncation wiring, without a model: keys, bypass, TTL and byte bound
through ServerConfig, stream replay, the usage extensions, and the new flags."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from starlette.datastructures import Headers

from loom.config import EngineConfig
from loom.entrypoints.cli import build_parser
from loom.entrypoints.server import ServerConfig
from loom.entrypoints.server import protocol as p
from loom.entrypoints.server.cli import server_config_from_args
from loom.entrypoints.server.fields import sampling_params
from loom.entrypoints.server.response_caching import (
    bypassed,
    lookup,
    refreshed,
    replay_chat,
    replay_completion,
)
from loom.entrypoints.server.serving import ServerState
from loom.errors import InvalidRequest

NO_HEADERS = Headers({})


def completion(**fields) -> p.CompletionRequest:
    return p.CompletionRequest(**{"prompt": "hi", "temperature": 0, **fields})


def slot_for(state: ServerState, body: p.CompletionRequest, headers: Headers = NO_HEADERS, policy="error"):
    params = sampling_params(body, 16, body.max_tokens)
    return lookup(state.response_cache, "completions", body, params, state.model_name, policy, headers)


def answer(text: str, finish: str = "length") -> dict:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "loom-tiny",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }


def state(**config) -> ServerState:
    return ServerState(EngineConfig(), ServerConfig(**config))  # the engine is never started


def test_key_applies_defaults_and_ignores_delivery_and_hints():
    s = state()
    key = slot_for(s, completion()).key
    assert key is not None
    same = completion(
        n=1, top_p=1.0, top_k=-1, stop=[], stream=True, user="u", program_id="run-7", priority=3, cache=True
    )
    assert slot_for(s, same).key == key  # defaults spelled out, delivery fields, scheduling hints
    assert slot_for(s, completion(max_tokens=17)).key != key
    assert slot_for(s, completion(top_k=5)).key != key
    assert slot_for(s, completion(), policy="left").key != key  # the policy in effect is part of it
    assert slot_for(s, completion(model="other")).key == key  # the server has one model: its name is keyed


def test_only_deterministic_requests_use_the_cache():
    s = state()
    assert slot_for(s, completion(temperature=0.7)).key is None
    assert slot_for(s, completion(temperature=None)).key is None  # OpenAI's default is 1
    assert slot_for(s, completion(temperature=0.7, seed=3)).key is not None
    assert slot_for(state(response_cache=False), completion()).key is None


def test_bypass_by_field_or_header():
    assert bypassed(completion(cache=False), NO_HEADERS)
    assert not bypassed(completion(cache=True), NO_HEADERS)
    for headers in (
        {"Cache-Control": "no-cache"},
        {"cache-control": "max-age=0, no-store"},
        {"X-Loom-Cache": "bypass"},
    ):
        assert bypassed(completion(), Headers(headers)), headers
    assert not bypassed(completion(), Headers({"cache-control": "max-age=60"}))
    s = state()
    slot_for(s, completion()).store(answer("x"))
    assert slot_for(s, completion()).hit is not None
    assert slot_for(s, completion(cache=False)).hit is None


def test_ttl_from_server_config_expires_answers():
    s = state(response_cache_ttl_s=0.2)
    slot_for(s, completion()).store(answer("x"))
    assert slot_for(s, completion()).hit["choices"][0]["text"] == "x"
    time.sleep(0.3)
    assert slot_for(s, completion()).hit is None
    assert s.response_cache.stats.entries == 0


def test_byte_bound_from_server_config_evicts_least_recent():
    size = len(json.dumps(answer("x"), separators=(",", ":")))  # as stored: 3 answers fit, 4 do not
    s = state(response_cache_max_bytes=3 * size)
    for k in range(6):
        slot_for(s, completion(max_tokens=10 + k)).store(answer(str(k)))
    stats = s.response_cache.stats
    assert stats.bytes <= 3 * size and stats.evictions == 3 and stats.entries == 3
    assert slot_for(s, completion(max_tokens=10)).hit is None
    assert slot_for(s, completion(max_tokens=15)).hit["choices"][0]["text"] == "5"


def test_unfinished_answers_are_not_stored():
    s = state()
    slot_for(s, completion()).store(answer("x", finish="abort"))
    slot_for(s, completion()).store(answer("x", finish=None))
    assert s.response_cache.stats.entries == 0


def test_refreshed_answer_has_a_new_id_and_the_headers():
    cached = answer("x")
    cached["usage"]["truncated_prompt_tokens"] = 12
    fresh, headers = refreshed(cached, "cmpl")
    assert fresh["id"].startswith("cmpl-") and fresh["id"] != cached["id"] and fresh["created"] > 1
    assert fresh["choices"] == cached["choices"] and cached["id"] == "cmpl-1"  # the cached copy is untouched
    assert headers == {"x-loom-cache": "hit", "x-loom-truncated-tokens": "12"}
    assert refreshed(answer("x"), "cmpl")[1] == {"x-loom-cache": "hit"}


def collect(stream) -> list:
    async def run():
        return [chunk async for chunk in stream]

    return asyncio.run(run())


def test_chat_replay_rebuilds_the_answer():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    response = {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"},
            {
                "index": 1,
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "finish_reason": "tool_calls",
            },
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10},
    }
    chunks = collect(replay_chat(response, include_usage=True))
    assert all(c.id == "chatcmpl-9" and c.created == 5 for c in chunks)
    assert [c.choices[0].delta.role for c in chunks[:2]] == ["assistant", "assistant"]
    by_index: dict[int, list] = {0: [], 1: []}
    for c in chunks[:-1]:
        by_index[c.choices[0].index].append(c.choices[0])
    assert "".join(ch.delta.content or "" for ch in by_index[0]) == "hello"
    assert [ch.finish_reason for ch in by_index[0] if ch.finish_reason] == ["stop"]
    (delta_call,) = [t for ch in by_index[1] for t in ch.delta.tool_calls or []]
    assert (delta_call.index, delta_call.id, delta_call.function.arguments) == (0, "call_1", '{"a": 1}')
    assert [ch.finish_reason for ch in by_index[1] if ch.finish_reason] == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 10
    assert collect(replay_chat(response, include_usage=False))[-1].choices != []


def test_completion_replay_rebuilds_the_answer():
    chunks = collect(replay_completion(answer("abc"), include_usage=True))
    assert [c.choices[0].text for c in chunks[:-1]] == ["abc"]
    assert chunks[0].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 2
    assert len(collect(replay_completion(answer("abc"), include_usage=False))) == 1


def test_usage_extensions_appear_only_when_cut():
    plain = p.Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2).model_dump()
    assert "truncated_prompt_tokens" not in plain and "dropped_messages" not in plain
    cut = p.Usage(
        prompt_tokens=1, completion_tokens=1, total_tokens=2, truncated_prompt_tokens=7, dropped_messages=2
    )
    assert (cut.model_dump()["truncated_prompt_tokens"], cut.model_dump()["dropped_messages"]) == (7, 2)
    assert '"truncated_prompt_tokens":7' in cut.model_dump_json()


def test_truncation_policy_per_request_and_server():
    s = state(truncation="drop_turns")
    assert s.truncation_policy(completion(), chat=True) == "drop_turns"
    assert s.truncation_policy(completion(), chat=False) == "left"  # completions have no turns
    assert s.truncation_policy(completion(truncation="error"), chat=True) == "error"
    assert s.truncation_policy(completion(truncation="drop_turns"), chat=False) == "drop_turns"
    with pytest.raises(InvalidRequest) as e:
        s.truncation_policy(completion(truncation="middle"), chat=True)
    assert e.value.param == "truncation"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"truncation": "right"}, "truncation"),
        ({"response_cache_max_bytes": 0}, "response_cache_max_bytes"),
        ({"response_cache_ttl_s": 0}, "response_cache_ttl_s"),
    ],
)
def test_server_config_rejects_bad_reuse_values(fields, param):
    with pytest.raises(InvalidRequest) as e:
        ServerConfig(**fields)
    assert e.value.param == param


def test_reuse_flags():
    args = build_parser().parse_args(
        ["serve", "--truncation", "left", "--no-response-cache", "--response-cache-max-bytes", "1000",
         "--response-cache-ttl-s", "2.5"]
    )  # fmt: skip
    config = server_config_from_args(args)
    assert (config.truncation, config.response_cache) == ("left", False)
    assert (config.response_cache_max_bytes, config.response_cache_ttl_s) == (1000, 2.5)
    defaults = ServerConfig()
    assert (defaults.truncation, defaults.response_cache) == ("error", True)
    assert (defaults.response_cache_max_bytes, defaults.response_cache_ttl_s) == (64 * 2**20, 600.0)


def test_metrics_expose_the_response_cache():
    s = state()
    slot_for(s, completion()).store(answer("x"))
    slot_for(s, completion())  # a hit
    text = s.metrics.render().decode()
    assert "loom_response_cache_hits_total 1.0" in text and "loom_response_cache_misses_total 1.0" in text
    assert "loom_response_cache_entries 1.0" in text
    assert f"loom_response_cache_bytes {float(s.response_cache.stats.bytes)}" in text
    for name in (
        "loom_engine_steps_total",
        "loom_prefix_cache_evictions_total",
        "loom_prefix_cache_cached_blocks",
    ):
        assert name in text, name
