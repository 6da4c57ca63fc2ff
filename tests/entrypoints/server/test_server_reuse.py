"""Reuse for agent workloads on a real `loom serve`: truncation policies (context of 256 tokens), the
response cache (hits without a forward pass, streamed replays, what is never stored), prefix-cache
metrics, and releasing an agent program's pinned KV."""

from __future__ import annotations

import re

import httpx
import pytest

API_KEY = "sk-loom-reuse"
REUSE_MAX_MODEL_LEN = 256
# A few small answers only, so eviction shows within a few requests.
REUSE_CACHE_BYTES = 4096
FILLER = "The river ran past the old mill and on into the green valley below. "
MAX_TOKENS = 8
BUDGET = REUSE_MAX_MODEL_LEN - MAX_TOKENS


@pytest.fixture(scope="module")
def reuse_server(launch_server):
    """Its own process, so its step counter moves for these tests' requests alone."""
    server = launch_server(
        "reuse", "--max-model-len", str(REUSE_MAX_MODEL_LEN),
        "--response-cache-max-bytes", str(REUSE_CACHE_BYTES), api_key=API_KEY,
    )  # fmt: skip
    return server.wait_ready()


def long_chat(turns: int = 6) -> list[dict]:
    """A conversation well over the budget: a short system prompt, then `turns` long exchanges."""
    messages = [{"role": "system", "content": "You are terse."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question {i}: " + FILLER * 2})
        messages.append({"role": "assistant", "content": f"Answer {i}: " + FILLER})
    messages.append({"role": "user", "content": "And now?"})
    return messages


def post(server, path: str, **body) -> httpx.Response:
    with server.http() as http:
        return http.post(path, json={"model": server.model, "max_tokens": MAX_TOKENS, **body})


def error_of(resp: httpx.Response, param: str, code: str | None = "context_length_exceeded") -> str:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["code"] == code, error
    return error["message"]


def truncation_metrics(server, policy: str) -> tuple[float, float]:
    return (
        server.metric("loom_truncated_requests_total", f'policy="{policy}"'),
        server.metric("loom_truncated_tokens_total"),
    )


# ---- truncation -------------------------------------------------------------------------------------


def test_chat_truncation_policies(reuse_server):
    messages = long_chat()
    message = error_of(post(reuse_server, "/v1/chat/completions", messages=messages), "messages")
    full = int(re.search(r"has (\d+) tokens", message).group(1))
    assert full > REUSE_MAX_MODEL_LEN

    before = truncation_metrics(reuse_server, "left")
    left = post(reuse_server, "/v1/chat/completions", messages=messages, truncation="left")
    assert left.status_code == 200, left.text
    usage = left.json()["usage"]
    assert usage["prompt_tokens"] == BUDGET and usage["truncated_prompt_tokens"] == full - BUDGET
    assert usage["dropped_messages"] == 0
    assert left.headers["x-loom-truncated-tokens"] == str(full - BUDGET)
    assert truncation_metrics(reuse_server, "left") == (before[0] + 1, before[1] + full - BUDGET)

    before = truncation_metrics(reuse_server, "drop_turns")
    dropped = post(reuse_server, "/v1/chat/completions", messages=messages, truncation="drop_turns")
    assert dropped.status_code == 200, dropped.text
    usage = dropped.json()["usage"]
    assert (
        usage["prompt_tokens"] <= BUDGET and usage["truncated_prompt_tokens"] == full - usage["prompt_tokens"]
    )
    # Whole exchanges go (a user message and its answer), oldest first; the last question stays.
    assert usage["dropped_messages"] >= 2 and usage["dropped_messages"] % 2 == 0
    assert dropped.headers["x-loom-truncated-tokens"] == str(usage["truncated_prompt_tokens"])
    assert truncation_metrics(reuse_server, "drop_turns")[0] == before[0] + 1

    fits = post(reuse_server, "/v1/chat/completions", messages=messages[-1:], truncation="left")
    assert fits.status_code == 200 and "x-loom-truncated-tokens" not in fits.headers
    assert "truncated_prompt_tokens" not in fits.json()["usage"]


@pytest.mark.parametrize("policy", ["error", "left", "drop_turns"])
def test_system_prompt_over_the_budget_is_400_whatever_the_policy(reuse_server, policy):
    messages = [{"role": "system", "content": FILLER * 20}, {"role": "user", "content": "hi"}]
    message = error_of(
        post(reuse_server, "/v1/chat/completions", messages=messages, truncation=policy), "messages"
    )
    assert ("system prompt" if policy != "error" else "conversation") in message


def test_completion_truncation_policies(reuse_server):
    ids = [5 + i % 50 for i in range(300)]
    error_of(post(reuse_server, "/v1/completions", prompt=ids), "prompt")
    before = truncation_metrics(reuse_server, "left")
    left = post(reuse_server, "/v1/completions", prompt=ids, truncation="left", echo=True, logprobs=0)
    assert left.status_code == 200, left.text
    body = left.json()
    assert (
        body["usage"]["prompt_tokens"] == BUDGET and body["usage"]["truncated_prompt_tokens"] == 300 - BUDGET
    )
    assert "dropped_messages" not in body["usage"]  # chat only
    assert left.headers["x-loom-truncated-tokens"] == str(300 - BUDGET)
    # echo shows the prompt that ran: its last BUDGET tokens.
    assert len(body["choices"][0]["logprobs"]["tokens"]) == BUDGET + body["usage"]["completion_tokens"]
    assert truncation_metrics(reuse_server, "left") == (before[0] + 1, before[1] + 300 - BUDGET)
    # drop_turns needs turns; a completion that would need cutting under it is the client's error.
    error_of(post(reuse_server, "/v1/completions", prompt=ids, truncation="drop_turns"), "truncation", None)
    assert post(reuse_server, "/v1/completions", prompt=ids[:10], truncation="drop_turns").status_code == 200


def test_unknown_truncation_policy_is_400(reuse_server):
    chat = [{"role": "user", "content": "hi"}]
    error_of(
        post(reuse_server, "/v1/chat/completions", messages=chat, truncation="middle"), "truncation", None
    )
    error_of(post(reuse_server, "/v1/completions", prompt="hi", truncation="middle"), "truncation", None)


# ---- response cache ---------------------------------------------------------------------------------


def steps(server) -> float:
    return server.metric("loom_engine_steps_total")


def test_repeated_greedy_request_runs_no_forward_pass(reuse_server):
    chat = [{"role": "user", "content": "Greedy question one."}]
    hits = reuse_server.metric("loom_response_cache_hits_total")
    misses = reuse_server.metric("loom_response_cache_misses_total")
    start = steps(reuse_server)
    first = post(reuse_server, "/v1/chat/completions", messages=chat, temperature=0)
    assert first.status_code == 200 and first.headers["x-loom-cache"] == "miss"
    after_first = steps(reuse_server)
    assert after_first > start
    second = post(reuse_server, "/v1/chat/completions", messages=chat, temperature=0)
    assert second.headers["x-loom-cache"] == "hit"
    assert steps(reuse_server) == after_first  # answered without the engine
    a, b = first.json(), second.json()
    assert b["choices"] == a["choices"] and b["usage"] == a["usage"]
    assert b["id"] != a["id"] and b["id"].startswith("chatcmpl-") and b["created"] >= a["created"]
    assert reuse_server.metric("loom_response_cache_hits_total") == hits + 1
    assert reuse_server.metric("loom_response_cache_misses_total") == misses + 1
    # A request differing in one sampling field is another request.
    third = post(reuse_server, "/v1/chat/completions", messages=chat, temperature=0, top_k=3)
    assert third.headers["x-loom-cache"] == "miss" and steps(reuse_server) > after_first


def test_streams_are_answered_from_and_stored_into_the_cache(reuse_server):
    client = reuse_server.openai()
    kwargs = dict(
        model=reuse_server.model,
        messages=[{"role": "user", "content": "Stream me."}],
        max_tokens=10,
        temperature=0,
    )
    full = client.chat.completions.create(**kwargs)
    start, hits = steps(reuse_server), reuse_server.metric("loom_response_cache_hits_total")
    raw = client.chat.completions.with_raw_response.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["x-loom-cache"] == "hit"
    chunks = list(raw.parse())
    assert steps(reuse_server) == start and reuse_server.metric("loom_response_cache_hits_total") == hits + 1
    assert chunks[0].choices[0].delta.role == "assistant" and len({c.id for c in chunks}) == 1
    assert chunks[0].id != full.id
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == full.choices[0].message.content
    )
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    # The other way round, on completions: a streamed answer is stored, then served whole.
    ckw = dict(model=reuse_server.model, prompt="Stream then ask", max_tokens=10, temperature=0)
    streamed = list(client.completions.create(**ckw, stream=True))
    start = steps(reuse_server)
    raw = client.completions.with_raw_response.create(**ckw)
    assert raw.headers["x-loom-cache"] == "hit" and steps(reuse_server) == start
    assert raw.parse().choices[0].text == "".join(c.choices[0].text for c in streamed if c.choices)


def test_sampled_requests_without_a_seed_are_never_cached(reuse_server):
    entries = reuse_server.metric("loom_response_cache_entries")
    hits = reuse_server.metric("loom_response_cache_hits_total")
    for _ in range(2):
        start = steps(reuse_server)
        resp = post(reuse_server, "/v1/completions", prompt="Sampled", temperature=0.7)
        assert resp.headers["x-loom-cache"] == "miss" and steps(reuse_server) > start
    assert reuse_server.metric("loom_response_cache_entries") == entries
    assert reuse_server.metric("loom_response_cache_hits_total") == hits
    # A fixed seed makes sampling deterministic: the second call is a hit.
    seeded = [
        post(reuse_server, "/v1/completions", prompt="Sampled", temperature=0.7, seed=11) for _ in range(2)
    ]
    assert [r.headers["x-loom-cache"] for r in seeded] == ["miss", "hit"]
    assert seeded[0].json()["choices"] == seeded[1].json()["choices"]


def test_bypass_by_field_and_headers(reuse_server):
    body = {"model": reuse_server.model, "prompt": "Bypass me", "max_tokens": MAX_TOKENS, "temperature": 0}
    assert post(reuse_server, "/v1/completions", **body).headers["x-loom-cache"] == "miss"
    with reuse_server.http() as http:
        for extra, headers in (
            ({"cache": False}, {}),
            ({}, {"Cache-Control": "no-cache"}),
            ({}, {"x-loom-cache": "bypass"}),
        ):
            start = steps(reuse_server)
            resp = http.post("/v1/completions", json={**body, **extra}, headers=headers)
            assert resp.headers["x-loom-cache"] == "miss" and steps(reuse_server) > start, (extra, headers)
        assert http.post("/v1/completions", json=body).headers["x-loom-cache"] == "hit"  # still there


def test_byte_bound_evicts_the_least_recent(reuse_server):
    evictions = reuse_server.metric("loom_response_cache_evictions_total")
    prompts = [f"Evict number {i}" for i in range(12)]  # ~350 bytes each: more than 4 KiB together
    for prompt in prompts:
        assert (
            post(reuse_server, "/v1/completions", prompt=prompt, temperature=0).headers["x-loom-cache"]
            == "miss"
        )
    assert 0 < reuse_server.metric("loom_response_cache_bytes") <= REUSE_CACHE_BYTES
    assert reuse_server.metric("loom_response_cache_evictions_total") > evictions
    assert (
        post(reuse_server, "/v1/completions", prompt=prompts[-1], temperature=0).headers["x-loom-cache"]
        == "hit"
    )
    assert (
        post(reuse_server, "/v1/completions", prompt=prompts[0], temperature=0).headers["x-loom-cache"]
        == "miss"
    )


def test_a_stream_cut_by_a_disconnect_is_not_stored(reuse_server, wait_for):
    body = {
        "model": reuse_server.model,
        "prompt": "Hang up on me",
        "max_tokens": 240,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    entries = reuse_server.metric("loom_response_cache_entries")
    aborts = reuse_server.metric("loom_requests_total", 'finish_reason="abort"')
    with reuse_server.http() as http:
        for attempt in range(2):
            with http.stream("POST", "/v1/completions", json=body) as resp:
                assert resp.headers["x-loom-cache"] == "miss", attempt  # the first was never stored
                next(line for line in resp.iter_lines() if line.startswith("data: "))
            # Leaving the block closed the connection after one chunk of 240 tokens.
            assert wait_for(
                lambda n=attempt: (
                    reuse_server.metric("loom_requests_total", 'finish_reason="abort"') == aborts + n + 1
                )
            )
    assert reuse_server.metric("loom_response_cache_entries") == entries


# ---- prefix-cache metrics and agent programs --------------------------------------------------------


def test_prefix_cache_metrics(reuse_server):
    system = {"role": "system", "content": FILLER * 3}
    for question in ("One?", "Two?"):
        resp = reuse_server.openai().chat.completions.create(
            model=reuse_server.model, messages=[system, {"role": "user", "content": question}], max_tokens=2
        )
    assert resp.usage.prompt_tokens_details.cached_tokens >= 32  # the shared system prompt's blocks
    assert reuse_server.metric("loom_prefix_cache_hits_total") >= 32
    assert reuse_server.metric("loom_prefix_cache_queries_total") >= reuse_server.metric(
        "loom_prefix_cache_hits_total"
    )
    cached = reuse_server.metric("loom_prefix_cache_cached_blocks")
    assert cached > 0 and cached == reuse_server.metric("loom_kv_cached_blocks")
    text = httpx.get(reuse_server.url + "/metrics", headers=reuse_server.headers).text
    assert "loom_prefix_cache_evictions_total" in text and "loom_engine_steps_total" in text


def test_release_program_unpins_its_kv(reuse_server, wait_for):
    resp = post(
        reuse_server,
        "/v1/chat/completions",
        messages=[{"role": "user", "content": FILLER * 2}],
        program_id="run-release",
        cache=False,
    )
    assert resp.status_code == 200
    assert reuse_server.metric("loom_kv_pinned_blocks") > 0  # kept for the program's next call
    assert httpx.post(reuse_server.url + "/v1/programs/run-release/release").status_code == 401
    with reuse_server.http() as http:
        released = http.post("/v1/programs/run-release/release")
    assert released.status_code == 200 and released.json() == {"released": True}
    assert wait_for(lambda: reuse_server.metric("loom_kv_pinned_blocks") == 0, timeout=10)
