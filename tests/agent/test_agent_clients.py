"""OpenAIClient against a mock OpenAI-compatible HTTP server: request shape (program_id in the body,
sampling split between OpenAI fields and extra_body) and reading replies, streamed or not."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from loom.agent.clients import ChatClient, OpenAIClient

openai = pytest.importorskip("openai")


def completion(message: dict, finish_reason: str = "stop") -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "tiny",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 7,
            "total_tokens": 107,
            "prompt_tokens_details": {"cached_tokens": 96},
        },
    }


def chunk(delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> str:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "tiny", "choices": choices}
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


class Server:
    """Answers /v1/models and /v1/chat/completions like an OpenAI-compatible server; keeps the requests."""

    def __init__(self) -> None:
        self.requests: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(
                200,
                json={
                    "object": "list",
                    "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "loom"}],
                },
            )
        body = json.loads(request.content)
        self.requests.append(body)
        if body.get("stream"):
            events = [
                chunk({"role": "assistant", "content": ""}),
                chunk({"content": "Hel"}),
                chunk({"content": "lo"}),
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_9",
                                "type": "function",
                                "function": {"name": "calculator", "arguments": '{"expr'},
                            }
                        ]
                    }
                ),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ession": "1+1"}'}}]}),
                chunk({}, finish_reason="tool_calls"),
                chunk(
                    {},
                    usage={
                        "prompt_tokens": 50,
                        "completion_tokens": 3,
                        "total_tokens": 53,
                        "prompt_tokens_details": {"cached_tokens": 48},
                    },
                ),
                "data: [DONE]\n\n",
            ]
            return httpx.Response(200, text="".join(events), headers={"content-type": "text/event-stream"})
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression": "2*3"}'},
                }
            ],
        }
        return httpx.Response(200, json=completion(message, "tool_calls"))


def make_client(server: Server) -> OpenAIClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(server))
    return OpenAIClient("http://mock/v1", "key", http_client=http)


def test_openai_client_sends_program_id_and_reads_tool_calls_and_cached_tokens():
    server = Server()
    client = make_client(server)
    assert isinstance(client, ChatClient)
    result = asyncio.run(
        client.chat(
            [{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "calculator", "parameters": {}}}],
            program_id="run-1",
            max_tokens=8,
            temperature=0,
            top_k=5,
        )
    )
    body = server.requests[0]
    assert body["model"] == "tiny"  # asked /v1/models for it
    assert body["program_id"] == "run-1" and body["top_k"] == 5
    assert (
        body["max_tokens"] == 8
        and body["temperature"] == 0
        and body["tools"][0]["function"]["name"] == "calculator"
    )
    assert result.tool_calls[0].name == "calculator" and json.loads(result.tool_calls[0].arguments) == {
        "expression": "2*3"
    }
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.cached_tokens) == (
        100,
        7,
        96,
    )
    assert result.finish_reason == "tool_calls"


def test_openai_client_streams_tokens_and_assembles_tool_calls():
    server = Server()
    client = make_client(server)
    tokens: list[str] = []
    result = asyncio.run(
        client.chat([{"role": "user", "content": "hi"}], program_id="run-2", on_token=tokens.append)
    )
    assert server.requests[0]["stream"] and server.requests[0]["program_id"] == "run-2"
    assert tokens == ["Hel", "lo"] and result.content == "Hello"
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [
        ("call_9", "calculator", '{"expression": "1+1"}')
    ]
    assert result.usage.cached_tokens == 48 and result.finish_reason == "tool_calls"
