"""The OpenAI API of a real `loom serve` process, driven by the official openai SDK (sync and async).

The tiny model has random weights, so tests check structure, determinism and accounting, not wording.
"""

from __future__ import annotations

import asyncio
import math

import httpx

CHAT = [{"role": "user", "content": "Tell me about the river."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_health_ready_and_models(server):
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    with server.http() as http:
        assert http.get("/ready").json() == {"status": "ready"}
    models = server.openai().models.list()
    assert [m.id for m in models.data] == [server.model]
    assert models.data[0].object == "model"
    assert models.data[0].model_extra["max_model_len"] == 4096


def test_chat_completion_schema(server):
    resp = server.openai().chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=6, temperature=0
    )
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.model == server.model and isinstance(resp.created, int)
    (choice,) = resp.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.tool_calls is None
    assert choice.finish_reason in ("stop", "length")
    u = resp.usage
    assert u.prompt_tokens > 5 and 1 <= u.completion_tokens <= 6
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0


def test_chat_list_content_parts_render_like_a_string(server):
    client = server.openai()
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Tell me about "}, {"type": "text", "text": "the river."}],
        }
    ]
    a = client.chat.completions.create(model=server.model, messages=parts, max_tokens=4, temperature=0)
    b = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=4, temperature=0)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content


def test_chat_streaming_equals_non_streaming(server):
    client = server.openai()
    kwargs = dict(model=server.model, messages=CHAT, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == full.id or c.id.startswith("chatcmpl-") for c in chunks)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_streaming_equals_non_streaming_async(server):
    async def run():
        client = server.async_openai()
        kwargs = dict(model=server.model, prompt="The river ran low", max_tokens=10, temperature=0)
        full = await client.completions.create(**kwargs)
        stream = await client.completions.create(**kwargs, stream=True)
        chunks = [c async for c in stream]
        return full, chunks

    full, chunks = asyncio.run(run())
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        full.choices[0].finish_reason
    ]


def test_n2_with_seed_is_reproducible(server):
    client = server.openai()

    def run():
        resp = client.chat.completions.create(
            model=server.model, messages=CHAT, n=2, seed=1234, temperature=1.0, max_tokens=8
        )
        assert sorted(c.index for c in resp.choices) == [0, 1]
        return [c.message.content for c in sorted(resp.choices, key=lambda c: c.index)]

    first, second = run(), run()
    assert first == second
    assert first[0] != first[1]  # each choice samples its own stream
    assert (
        client.chat.completions.create(
            model=server.model, messages=CHAT, n=2, seed=99, temperature=1.0, max_tokens=8
        )
        .choices[0]
        .message.content
        != first[0]
    )


def test_stop_string_cuts_the_output(server):
    client = server.openai()
    kwargs = dict(
        model=server.model, prompt="The valley", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    text = client.completions.create(**kwargs).choices[0].text
    # A clean two-character stop string from the middle of the greedy output.
    k = next(i for i in range(2, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].isalnum())
    stop = text[k : k + 2]
    resp = client.completions.create(**kwargs, stop=[stop])
    assert resp.choices[0].text == text[: text.index(stop)]
    assert resp.choices[0].finish_reason == "stop"
    kept = client.completions.create(
        **{**kwargs, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}}, stop=stop
    )
    assert kept.choices[0].text == text[: text.index(stop) + len(stop)]


def test_chat_logprobs_greedy_picks_the_top_token(server):
    resp = server.openai().chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert t.top_logprobs[0].token == t.token and math.isclose(
            t.top_logprobs[0].logprob, t.logprob, abs_tol=1e-5
        )
        assert bytes(t.bytes).decode() == t.token


def test_echo_with_zero_max_tokens_returns_prompt_logprobs(server):
    client = server.openai()
    resp = client.completions.create(
        model=server.model, prompt="The river ran low", max_tokens=0, echo=True, logprobs=1
    )
    (choice,) = resp.choices
    lp = choice.logprobs
    assert choice.text == "The river ran low"
    assert resp.usage.completion_tokens == 0 and len(lp.tokens) == resp.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert all(
        len(top) == 1 and max(top.values()) >= x
        for top, x in zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True)
    )
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # n=2 with echo: each choice carries the prompt's logprobs exactly once, then its own token.
    two = client.completions.create(
        model=server.model, prompt=[5, 6, 7, 8, 9], max_tokens=1, echo=True, logprobs=1, n=2
    )
    assert [len(c.logprobs.tokens) for c in two.choices] == [6, 6]
    assert two.choices[0].logprobs.token_logprobs[:5] == two.choices[1].logprobs.token_logprobs[:5]


def test_prompt_forms(server):
    client = server.openai()
    strings = client.completions.create(
        model=server.model, prompt=["one", "two words"], max_tokens=2, temperature=0
    )
    assert [c.index for c in strings.choices] == [0, 1]
    ids = client.completions.create(model=server.model, prompt=[11, 12, 13], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 3
    lists = client.completions.create(
        model=server.model, prompt=[[11, 12, 13], [14, 15]], max_tokens=2, temperature=0, n=2
    )
    assert sorted(c.index for c in lists.choices) == [0, 1, 2, 3]
    assert lists.usage.prompt_tokens == 5 and lists.usage.completion_tokens == 8
    # The same prompt as ids or inside a list gives the same greedy text.
    assert lists.choices[0].text == ids.choices[0].text


def test_prefix_cache_hits_show_in_usage_and_metrics(server):
    client = server.openai()
    system = {"role": "system", "content": "You are a careful assistant. " * 12}
    before = server.metric("loom_prefix_cache_hits_total")
    first = client.chat.completions.create(model=server.model, messages=[system, *CHAT], max_tokens=2)
    second = client.chat.completions.create(
        model=server.model, messages=[system, {"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert first.usage.prompt_tokens > 64
    assert (
        second.usage.prompt_tokens_details.cached_tokens >= 48
    )  # whole 16-token blocks of the system prompt
    assert (
        server.metric("loom_prefix_cache_hits_total") - before
        >= second.usage.prompt_tokens_details.cached_tokens
    )


def test_extensions_and_unknown_fields_are_accepted(server):
    resp = server.openai().chat.completions.create(
        model=server.model,
        messages=CHAT,
        max_tokens=7,
        user="tester",
        presence_penalty=0.5,
        frequency_penalty=0.5,
        top_p=0.9,
        extra_body={
            "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 7, "ignore_eos": True,
            "skip_special_tokens": False, "priority": 1, "stop_token_ids": [0], "some_future_field": {"x": 1},
        },
    )  # fmt: skip
    assert resp.usage.completion_tokens == 7  # min_tokens == max_tokens: nothing may stop it earlier


def test_tools_render_through_the_template(server):
    client = server.openai()

    def prompt_tokens(**kwargs) -> int:
        resp = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=3, **kwargs)
        (choice,) = resp.choices
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        if choice.finish_reason == "tool_calls":
            assert choice.message.tool_calls[0].type == "function"
        return resp.usage.prompt_tokens

    plain = prompt_tokens()
    auto = prompt_tokens(tools=[WEATHER_TOOL])
    assert auto > plain + 20  # the tool signature and instructions are in the prompt
    assert prompt_tokens(tools=[WEATHER_TOOL], tool_choice="none") == plain
    # A forced call is a grammar on the output: the prompt is the same as with tool_choice auto.
    named = prompt_tokens(
        tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert named == auto
    stream = client.chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=3, tools=[WEATHER_TOOL], stream=True
    )
    finishes = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1


def test_metrics_count_requests_tokens_and_latency(server):
    before = {
        name: server.metric(name)
        for name in (
            "loom_generation_tokens_total",
            "loom_prompt_tokens_total",
            "loom_time_to_first_token_seconds_count",
            "loom_e2e_request_latency_seconds_count",
            "loom_batch_size_count",
        )
    }
    length_before = server.metric("loom_requests_total", 'finish_reason="length"')
    resp = server.openai().completions.create(
        model=server.model, prompt=[21, 22, 23, 24], max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert resp.usage.completion_tokens == 5
    after = {name: server.metric(name) for name in before}
    assert after["loom_generation_tokens_total"] - before["loom_generation_tokens_total"] >= 5
    assert after["loom_prompt_tokens_total"] > before["loom_prompt_tokens_total"]
    for name in (
        "loom_time_to_first_token_seconds_count",
        "loom_e2e_request_latency_seconds_count",
        "loom_batch_size_count",
    ):
        assert after[name] > before[name], name
    assert server.metric("loom_requests_total", 'finish_reason="length"') >= length_before + 1
    assert server.metric("loom_kv_total_blocks") == 512
    text = httpx.get(server.url + "/metrics", headers=server.headers).text
    for name in ("loom_requests_waiting", "loom_kv_cache_usage_ratio", "loom_preemptions_total",
                 "loom_prefix_cache_queries_total", "loom_inter_token_latency_seconds_bucket",
                 "loom_request_queue_time_seconds_bucket"):  # fmt: skip
        assert name in text, name


def _pool_is_whole(server) -> bool:
    return server.metric("loom_requests_running") == 0 and server.metric(
        "loom_kv_free_blocks"
    ) == server.metric("loom_kv_total_blocks")


def test_concurrent_streams_with_hangups_free_everything(server, wait_for):
    """64 streams at once; every 4th client hangs up after two chunks of a very long request."""
    aborts_before = server.metric("loom_requests_total", 'finish_reason="abort"')

    async def one(client, i: int):
        hang_up = i % 4 == 0
        stream = await client.completions.create(
            model=server.model,
            prompt=f"Request number {i} asks about the river",
            max_tokens=3000 if hang_up else 8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            if hang_up and len(chunks) == 2:
                await stream.close()
                return None
        return chunks

    async def run():
        client = server.async_openai()
        return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(run())
    finished = [r for r in results if r is not None]
    assert len(finished) == 48
    for chunks in finished:
        assert chunks[-1].usage.completion_tokens == 8
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            "length"
        ]
    # The hung-up requests had thousands of tokens to go: only an abort frees them this soon.
    assert wait_for(lambda: _pool_is_whole(server), timeout=30), server.metric("loom_requests_running")
    assert server.metric("loom_requests_total", 'finish_reason="abort"') - aborts_before == 16


def test_non_streaming_disconnect_aborts(server, wait_for):
    aborts_before = server.metric("loom_requests_total", 'finish_reason="abort"')
    body = {"model": server.model, "prompt": "A very long answer", "max_tokens": 3000, "ignore_eos": True}
    try:
        httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=0.5)
        raise AssertionError("3000 tokens should not finish within the timeout")
    except httpx.TimeoutException:
        pass  # the client gave up and closed the connection
    assert wait_for(
        lambda: server.metric("loom_requests_total", 'finish_reason="abort"') == aborts_before + 1, timeout=30
    )
    assert wait_for(lambda: _pool_is_whole(server), timeout=30)
