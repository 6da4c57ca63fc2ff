"""The replica's in-process ASGI client against a real loom app (no Ray): what the ingress relays."""

from __future__ import annotations

import asyncio
import json

from loom.config import EngineConfig
from loom.entrypoints.server.app import create_app
from loom.entrypoints.server.config import ServerConfig
from loom.serving.replica import InProcessClient


def chat_body(stream: bool, max_tokens: int = 8) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens}
    return json.dumps(body | {"stream": stream, "ignore_eos": True, "temperature": 0}).encode()


JSON = [(b"content-type", b"application/json")]


async def exercise(app) -> dict:
    client = InProcessClient(app)
    async with app.router.lifespan_context(app):
        while (await client.call("GET", "/ready")).status != 200:
            await asyncio.sleep(0.05)
        out: dict = {}
        answer = await client.call("POST", "/v1/chat/completions", chat_body(stream=False))
        out["answer"] = (answer.status, json.loads(answer.body))
        items = [item async for item in client.stream("POST", "/v1/chat/completions", JSON, chat_body(True))]
        out["stream"] = items
        bad = await client.call("POST", "/v1/chat/completions", b"{not json")
        out["bad"] = bad.status
        # Leave a long stream after its first chunk: the app must see the disconnect and abort.
        stream = client.stream("POST", "/v1/chat/completions", JSON, chat_body(True, max_tokens=500))
        async for item in stream:
            if isinstance(item, bytes):
                break
        await stream.aclose()
        for _ in range(100):
            metrics = (await client.call("GET", "/metrics")).body.decode()
            if "loom_requests_running 0.0" in metrics:
                break
            await asyncio.sleep(0.05)
        out["running_after_abort"] = "loom_requests_running 0.0" in metrics
    return out


def test_in_process_client_relays_answers_streams_errors_and_disconnects(tiny_llama_dir):
    app = create_app(
        EngineConfig(model=str(tiny_llama_dir), num_threads=1, num_blocks=128),
        ServerConfig(served_model_name="m"),
    )
    out = asyncio.run(exercise(app))
    status, answer = out["answer"]
    assert status == 200 and answer["usage"]["completion_tokens"] == 8
    start, *chunks = out["stream"]
    assert start[0] == 200 and (b"content-type", b"text/event-stream; charset=utf-8") in start[1]
    text = b"".join(chunks).decode()
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    content = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert content == answer["choices"][0]["message"]["content"]
    assert out["bad"] == 400
    assert out["running_after_abort"]
