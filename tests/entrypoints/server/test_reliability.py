"""One request can never hurt another, and a dead engine fails loudly instead of hanging.

Faults come from tests/entrypoints/server/faulty_serve.py (hooks in tests, not in loom): a request that
fails inside the engine step fails alone while the requests batched with it finish with the tokens they
produce alone; an engine loop that dies, or a step that hangs past --step-timeout-s, fails every request
in flight at once, turns /health and /ready to 503, and exits the process non-zero."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

FAULTY = Path(__file__).with_name("faulty_serve.py")
POISON, KILL, HANG = 2001, 2002, 2003
MODEL = "loom-test"


@pytest.fixture(scope="module")
def fault_servers(launch_server):
    return {
        "poison": launch_server("poison", "--no-response-cache", entry=(str(FAULTY),)),
        "kill": launch_server("kill", entry=(str(FAULTY),)),
        "hang": launch_server("hang", "--step-timeout-s", "3", entry=(str(FAULTY),)),
    }


def _prompt(k: int) -> list[int]:
    return [(37 * k + 11 * j) % 1500 + 100 for j in range(5 + k)]


def _body(prompt: list[int], max_tokens: int = 12, stream: bool = False) -> dict:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


async def _stream_text(client: httpx.AsyncClient, body: dict, started: asyncio.Event | None = None) -> dict:
    """Reads an SSE completion; returns its text, finish reasons and any in-band error."""
    text, reasons, error = "", [], None
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                error = event["error"]
                continue
            if started is not None:
                started.set()
            for choice in event["choices"]:
                text += choice["text"]
                if choice["finish_reason"]:
                    reasons.append(choice["finish_reason"])
    return {"text": text, "finish_reasons": reasons, "error": error}


def test_a_request_failing_inside_the_step_fails_alone(fault_servers):
    server = fault_servers["poison"].wait_ready()
    prompts = [_prompt(k) for k in range(8)]
    with server.http() as http:
        alone = [http.post("/v1/completions", json=_body(p)).json()["choices"][0]["text"] for p in prompts]

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            started = [asyncio.Event() for _ in prompts]
            streams = [
                asyncio.create_task(_stream_text(client, _body(p, stream=True), ev))
                for p, ev in zip(prompts, started, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 120)
            # All 8 are decoding now: the poisoned prompt joins their batch.
            poisoned = await client.post("/v1/completions", json=_body([5, 6, POISON, 7]))
            return await asyncio.gather(*streams), poisoned

    results, poisoned = asyncio.run(together())
    assert poisoned.status_code == 500
    error = poisoned.json()["error"]
    assert error["type"] == "internal_server_error" and "engine" in error["message"]
    for got, want in zip(results, alone, strict=True):
        assert got["error"] is None and got["finish_reasons"] == ["length"]
        assert got["text"] == want
    # The engine lives on, and nothing the failed request held is left behind.
    with server.http() as http:
        assert http.get("/ready").status_code == 200
        assert http.post("/v1/completions", json=_body(prompts[0])).json()["choices"][0]["text"] == alone[0]
    assert server.metric("loom_requests_running") == 0
    assert server.metric("loom_kv_free_blocks") == server.metric("loom_kv_total_blocks")


def _engine_death(server, trigger: int) -> None:
    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            started = [asyncio.Event() for _ in range(3)]
            streams = [
                asyncio.create_task(_stream_text(client, _body(_prompt(k), 4000, stream=True), ev))
                for k, ev in enumerate(started)
            ]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 120)
            fatal = await client.post("/v1/completions", json=_body([5, 6, trigger]))
            return await asyncio.wait_for(asyncio.gather(*streams), 60), fatal

    results, fatal = asyncio.run(scenario())
    # Between the death and the exit the server may still answer: never 200 from a dead engine.
    for path in ("/ready", "/health"):
        try:
            assert httpx.get(server.url + path, timeout=10).status_code == 503
        except httpx.TransportError:
            pass  # already gone
    # Every request in flight ended with an error, none hung and none was cut silently.
    assert fatal.status_code == 503 and fatal.json()["error"]["code"] == "engine_dead"
    for r in results:
        assert r["error"] is not None and r["error"]["code"] == "engine_dead"
        assert r["finish_reasons"] == []
    assert server.proc.wait(timeout=60) != 0, "a dead engine must take the process down (non-zero)"
    log = server.log.read_text()
    assert "engine" in log and ("died" in log or "did not return" in log)


def test_engine_loop_death_fails_everything_and_exits_non_zero(fault_servers):
    _engine_death(fault_servers["kill"].wait_ready(), KILL)


def test_hung_step_is_caught_by_the_watchdog(fault_servers):
    _engine_death(fault_servers["hang"].wait_ready(), HANG)


# ---- bad input stops at the edge ------------------------------------------------------------------


def test_token_ids_outside_the_vocabulary_are_a_400_in_any_field(fault_servers):
    """The defect that once failed every request in flight: min_tokens bans the stop tokens in the
    sampler, which indexed with an id outside the vocabulary. Every token id is checked at the edge."""
    server = fault_servers["poison"].wait_ready()
    with server.http() as http:
        for body, param in [
            ({"prompt": "hi", "min_tokens": 1, "stop_token_ids": [10**9]}, "stop_token_ids"),
            ({"prompt": [5, 2048], "max_tokens": 1}, "prompt"),
            ({"prompt": [[5, 6], [7, -1]], "max_tokens": 1}, "prompt"),
        ]:
            resp = http.post("/v1/completions", json={"model": MODEL, **body})
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["param"] == param
        assert http.get("/ready").status_code == 200


def test_tokenizing_a_huge_prompt_does_not_block_the_event_loop(fault_servers):
    server = fault_servers["poison"].wait_ready()
    with server.http() as http:
        # Over --max-prompt-chars (1,000,000 by default): refused before any tokenizing.
        resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 3_900_000, "max_tokens": 1})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
        assert "characters" in resp.json()["error"]["message"]

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            # ~900k characters: tokenized (about a second of CPU) on a worker thread, then too long.
            big = asyncio.create_task(
                client.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 180_000})
            )
            answered = 0
            while not big.done():
                answered += (await client.get("/health")).status_code == 200
            return answered, await big

    answered, big = asyncio.run(scenario())
    assert big.status_code == 400 and big.json()["error"]["code"] == "context_length_exceeded"
    # Liveness kept answering while the prompt was tokenized (on the event loop it would answer ~1).
    assert answered >= 5, answered
