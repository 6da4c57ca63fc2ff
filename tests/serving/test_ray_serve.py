"""`loom serve --replicas` on a real Ray Serve (one local cluster on loopback for the whole module):
affinity and the imbalance fallback, bad input, canary rollback, and failover after kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import ray
from ray import serve
from ray_faults import BrokenEngineReplica

from loom.bench.workloads import words
from loom.config import EngineConfig
from loom.entrypoints.server.config import ServerConfig
from loom.serving.app import APP_NAME, build_app
from loom.serving.config import ScaleOutConfig

# Ray's own pydantic models warn on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODEL = "loom-test"  # the launch_server fixture's served model name
STABLE = {"x-loom-model-version": "stable"}
REPLICA_TITLE = f"ServeReplica:{APP_NAME}:replica-stable"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    url: str

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=180)

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        key = f"{name}{{{labels}}}" if labels else name
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(key + " "))


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir: Path) -> Cluster:
    # Workers import the test-only fault (ray_faults) from here; loom itself is installed.
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": f"{HERE}:{REPO}"}},
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        scale = ScaleOutConfig(
            replicas=2,
            canary=str(tiny_llama_dir),
            canary_weight=50,
            canary_step=0,
            rollback_window_s=600,
            rollback_min_requests=5,
            retry_backoff_s=0.2,
        )
        engine = EngineConfig(model=str(tiny_llama_dir), num_threads=1, num_blocks=512)
        app = build_app(
            scale,
            engine,
            ServerConfig(served_model_name=MODEL),
            replica_classes={"canary": BrokenEngineReplica},
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()


def chat(messages: list[dict], max_tokens: int = 8, **extra) -> dict:
    return {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    } | extra


# ---- affinity -----------------------------------------------------------------------------------


def sessions(n: int, turns: int, seed: int = 0) -> tuple[str, list[list[str]]]:
    rng = random.Random(seed)
    return "You are a careful agent. " + words(rng, 200), [
        [words(rng, 30) for _ in range(turns)] for _ in range(n)
    ]


async def run_sessions(url: str, headers: dict) -> list[list[tuple[str | None, int, int, str | None]]]:
    """16 agent sessions of 3 turns, all at once: (replica, prompt tokens, cached tokens, route reason) per
    call."""
    system, all_turns = sessions(16, 3)

    async def one(
        client: httpx.AsyncClient, turns: list[str]
    ) -> list[tuple[str | None, int, int, str | None]]:
        messages, calls = [{"role": "system", "content": system}], []
        for user in turns:
            messages.append({"role": "user", "content": user})
            r = await client.post("/v1/chat/completions", json=chat(messages), headers=headers)
            assert r.status_code == 200, r.text
            body = r.json()
            usage = body["usage"]
            calls.append(
                (
                    r.headers.get("x-loom-replica"),
                    usage["prompt_tokens"],
                    usage["prompt_tokens_details"]["cached_tokens"],
                    r.headers.get("x-loom-route"),
                )
            )
            messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        return calls

    async with httpx.AsyncClient(base_url=url, timeout=180) as client:
        return await asyncio.gather(*(one(client, turns) for turns in all_turns))


def hit_rate(results: list[list[tuple[str | None, int, int, str | None]]]) -> float:
    calls = [c for session in results for c in session]
    return sum(c[2] for c in calls) / sum(c[1] for c in calls)


def test_sessions_stick_to_a_replica_and_keep_the_single_replica_hit_rate(cluster, launch_server):
    single = launch_server("single-replica-baseline", "--num-blocks", "512").wait_ready()
    baseline = hit_rate(asyncio.run(run_sessions(single.url, {})))
    single.stop()

    results = asyncio.run(run_sessions(cluster.url, STABLE))
    for session in results:
        # A turn stays where its conversation is, unless one replica was swamped (on a busy machine one
        # replica can fall behind the other) and the router moved it on purpose.
        assert all(turn[3] is not None for turn in session), session
        for before, turn in zip(session, session[1:], strict=False):
            assert turn[0] == before[0] or turn[3] == "imbalanced", session
    used = {session[0][0] for session in results}
    assert len(used) == 2, "both replicas should get sessions"
    assert hit_rate(results) >= 0.9 * baseline, (hit_rate(results), baseline)


def test_a_flooded_replica_sends_the_overflow_to_the_other(cluster):
    before = cluster.metric("loom_router_routes_total", 'reason="imbalanced"')

    async def flood() -> list[str]:
        rng = random.Random(1)
        async with cluster.client() as client:
            # One program: its calls are pinned to one replica until that one is imbalanced.
            replies = await asyncio.gather(
                *(
                    client.post(
                        "/v1/chat/completions",
                        json=chat([{"role": "user", "content": words(rng, 20)}], 48, program_id="flood"),
                        headers=STABLE,
                    )
                    for _ in range(24)
                )
            )
        assert all(r.status_code == 200 for r in replies)
        return [r.headers["x-loom-replica"] for r in replies]

    replicas = asyncio.run(flood())
    assert len(set(replicas)) == 2
    assert cluster.metric("loom_router_routes_total", 'reason="imbalanced"') > before


# ---- bad input ----------------------------------------------------------------------------------


def test_unknown_model_version_is_a_400_naming_the_header(cluster):
    r = httpx.post(
        cluster.url + "/v1/chat/completions",
        json=chat([{"role": "user", "content": "hi"}]),
        headers={"x-loom-model-version": "v9"},
        timeout=60,
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "x-loom-model-version" and "v9" in error["message"]
    ok = httpx.get(cluster.url + "/v1/models", headers=STABLE, timeout=60)
    assert ok.status_code == 200 and ok.headers["x-loom-model-version"] == "stable"
    assert ok.json()["data"][0]["id"] == MODEL


# ---- canary rollback ----------------------------------------------------------------------------


def test_a_failing_canary_is_rolled_back_and_stable_traffic_sees_no_errors(cluster):
    async def traffic() -> list[httpx.Response]:
        async with cluster.client() as client:
            replies = []
            for batch in range(5):
                replies += await asyncio.gather(
                    *(
                        client.post(
                            "/v1/chat/completions",
                            json=chat(
                                [{"role": "user", "content": f"question {batch}-{i}"}],
                                user=f"user-{batch}-{i}",
                            ),
                        )
                        for i in range(6)
                    )
                )
            return replies

    replies = asyncio.run(traffic())
    # Canary failures happen before the first token, so each is retried on the stable version.
    assert [r.status_code for r in replies] == [200] * len(replies)
    assert {r.headers["x-loom-model-version"] for r in replies} == {"stable"}
    status = httpx.get(cluster.url + "/v1/router/status", timeout=30).json()
    assert status["canary_state"] == "rolled_back" and status["canary_weight"] == 0
    assert "5xx" in status["rollback_reason"]
    assert cluster.metric("loom_router_failed_attempts_total", 'version="canary"') >= 5
    assert cluster.metric("loom_router_requests_total", 'code="200",version="stable"') >= len(replies)
    assert cluster.metric("loom_canary_state") == 3


# ---- failover -----------------------------------------------------------------------------------


@dataclass
class StreamResult:
    status: int
    tokens: int = 0
    """Events with text (a token may decode to no text on its own: the tiny model's output is random)."""
    completion_tokens: int | None = None
    """From the final usage event."""
    error_after_tokens: int | None = None
    """Tokens received before an error event, if one came."""
    done: bool = False


async def stream_one(
    client: httpx.AsyncClient, i: int, first_tokens: asyncio.Event, counter: list[int]
) -> StreamResult:
    messages = [{"role": "user", "content": f"stream number {i} " + words(random.Random(i), 20)}]
    body = chat(messages, 64, stream=True, stream_options={"include_usage": True})
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=STABLE) as r:
        result = StreamResult(r.status_code)
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                result.done = True
                break
            event = json.loads(payload)
            if "error" in event:
                result.error_after_tokens = result.tokens
                continue
            if event.get("usage"):
                result.completion_tokens = event["usage"]["completion_tokens"]
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                result.tokens += 1
                if result.tokens == 1:
                    counter[0] += 1
                    if counter[0] >= 4:
                        first_tokens.set()
        return result


def replica_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["cmdline"]):
        if any(REPLICA_TITLE in part for part in proc.info["cmdline"] or []):
            pids.add(proc.pid)
    return pids


def test_kill_9_of_a_replica_mid_stream_loses_no_request_and_ray_restarts_it(cluster):
    failed_before = cluster.metric("loom_router_failed_attempts_total", 'version="stable"')
    pids = replica_pids()
    assert len(pids) == 2

    async def scenario() -> tuple[list[StreamResult], list[int]]:
        first_tokens, counter = asyncio.Event(), [0]
        async with cluster.client() as client:
            streams = [
                asyncio.create_task(asyncio.wait_for(stream_one(client, i, first_tokens, counter), 300))
                for i in range(32)
            ]
            await asyncio.wait_for(first_tokens.wait(), 120)
            os.kill(sorted(pids)[0], signal.SIGKILL)
            results = await asyncio.gather(*streams)
            after = await asyncio.gather(
                *(
                    client.post(
                        "/v1/chat/completions",
                        json=chat([{"role": "user", "content": f"after {i}"}]),
                        headers=STABLE,
                    )
                    for i in range(8)
                )
            )
        return results, [r.status_code for r in after]

    results, after = asyncio.run(scenario())
    for r in results:
        assert r.status == 200 and r.done  # none hangs (wait_for would raise), each ends with [DONE]
        if r.error_after_tokens is not None:
            assert r.error_after_tokens > 0, "an error event only after tokens were streamed"
        else:
            assert r.completion_tokens == 64
    affected = sum(r.error_after_tokens is not None for r in results)
    retried = cluster.metric("loom_router_failed_attempts_total", 'version="stable"') - failed_before
    assert affected + retried > 0, "the killed replica was serving some of the streams"
    assert after == [200] * 8

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        deployment = serve.status().applications[APP_NAME].deployments["replica-stable"]
        now = replica_pids()
        if deployment.replica_states.get("RUNNING", 0) == 2 and len(now) == 2 and sorted(pids)[0] not in now:
            break
        time.sleep(1)
    else:
        pytest.fail(f"Ray did not bring the replica back: {deployment}")
    r = httpx.post(
        cluster.url + "/v1/chat/completions",
        json=chat([{"role": "user", "content": "back"}]),
        headers=STABLE,
        timeout=120,
    )
    assert r.status_code == 200
