"""Every refusal of a real server: status code and OpenAI error body (400/401/404/413/429/503),
and the SIGTERM drain."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest

CHAT = [{"role": "user", "content": "hi"}]


def _chat(**fields) -> dict:
    return {"model": "loom-test", "messages": CHAT, "max_tokens": 4, **fields}


def _completion(**fields) -> dict:
    return {"model": "loom-test", "prompt": "hi", "max_tokens": 4, **fields}


def post_json(http: httpx.Client, path: str, body: dict) -> httpx.Response:
    """POST body as JSON written by Python's json, which escapes a lone surrogate as "\\ud800" (httpx's
    own encoder refuses to)."""
    return http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def assert_error(
    resp: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


BAD_CHAT = [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_tokens"),
    ({"n": 17}, "n"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"messages": []}, "messages"),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
            ]
        },
        "messages",
    ),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"temperature": "hot"}, "temperature"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"logit_bias": {"999999": 10}}, "logit_bias"),  # a token id outside the vocabulary
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"seed": 2**64}, "seed"),  # past torch's manual_seed: it used to overflow inside the engine (500)
    ({"seed": -(2**63) - 1}, "seed"),
    # Lone UTF-16 surrogates, wherever a string reaches the template or the tokenizer (they were 500s).
    ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages"),
    ({"messages": [{"role": "\ud800", "content": "hi"}]}, "messages"),
    ({"tools": [{"type": "function", "function": {"name": "f\udc00"}}]}, "tools"),
    ({"stop": ["ok", "\ud83d"]}, "stop"),
    # Types as the schema says: no strings for numbers, no numbers for booleans.
    ({"max_tokens": "4"}, "max_tokens"),
    ({"stream": 1}, "stream"),
    ({"stop_token_ids": [True]}, "stop_token_ids"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_CHAT, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_CHAT)])
def test_bad_chat_requests_get_400(server, fields, param):
    with server.http() as http:
        error = assert_error(post_json(http, "/v1/chat/completions", _chat(**fields)), 400, param)
    assert error["type"] == "invalid_request_error"
    if "image_url" in json.dumps(fields):
        assert "text only" in error["message"]


BAD_COMPLETIONS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 2, 999999]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"n": 0}, "n"),
    ({"min_tokens": 9}, "min_tokens"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"suffix": "tail"}, "suffix"),
    ({"seed": 2**64}, "seed"),
    ({"prompt": "x\ud800"}, "prompt"),
    ({"prompt": ["ok", "\udbff"]}, "prompt"),
    ({"prompt": [[False]]}, "prompt"),  # booleans are not token ids (it used to run as token 0)
    ({"prompt": [True, 5]}, "prompt"),
    ({"prompt": [1.0]}, "prompt"),
]


@pytest.mark.parametrize(
    ("fields", "param"), BAD_COMPLETIONS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_COMPLETIONS)]
)
def test_bad_completion_requests_get_400(server, fields, param):
    with server.http() as http:
        assert_error(post_json(http, "/v1/completions", _completion(**fields)), 400, param)


def test_context_length_and_nan_and_malformed_json(server):
    with server.http() as http:
        assert_error(
            http.post("/v1/completions", json=_completion(max_tokens=5000)),
            400,
            "max_tokens",
            "context_length_exceeded",
        )
        # Python's json (and so the openai SDK) writes NaN as a bare token; it must not slip through.
        nan = json.dumps(_chat(temperature=float("nan")))
        assert "NaN" in nan
        headers = {"Content-Type": "application/json"}
        assert_error(http.post("/v1/chat/completions", content=nan, headers=headers), 400, "temperature")
        error = assert_error(
            http.post("/v1/chat/completions", content=b'{"messages": [', headers=headers), 400
        )
        assert "JSON" in error["message"]
        assert_error(http.post("/v1/chat/completions", json={"model": "loom-test"}), 400, "messages")
        # echo makes max_tokens=0 legal
        assert http.post("/v1/completions", json=_completion(max_tokens=0, echo=True)).status_code == 200


def test_unknown_model_and_route_get_404(server):
    with server.http() as http:
        assert_error(
            http.post("/v1/chat/completions", json=_chat(model="gpt-9")), 404, "model", "model_not_found"
        )
        assert_error(
            http.post("/v1/completions", json=_completion(model="gpt-9")), 404, "model", "model_not_found"
        )
        assert_error(http.get("/v1/nothing-here"), 404)


@pytest.mark.parametrize(
    "path", ["/v1/models", "/metrics", "/ready", "/v1/chat/completions", "/v1/completions"]
)
def test_missing_or_wrong_key_gets_401(server, path):
    method = "POST" if path.endswith("completions") else "GET"
    body = _chat() if "chat" in path else _completion()
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {server.api_key}"}):
        resp = httpx.request(method, server.url + path, json=body, headers=headers, timeout=10)
        assert_error(resp, 401, code="invalid_api_key")
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_oversized_body_gets_413(server):
    big = _completion(prompt="x " * 40000)
    with server.http() as http:
        assert_error(http.post("/v1/completions", json=big), 413)

        def chunks():  # no Content-Length: only the bytes actually read can tell
            data = json.dumps(big).encode()
            for i in range(0, len(data), 8192):
                yield data[i : i + 8192]

        resp = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert "content-length" not in {k.lower() for k in resp.request.headers}
        assert_error(resp, 413)
        assert http.post("/v1/completions", json=_completion()).status_code == 200


class _Held:
    """A long streaming request whose first event was read, so it is surely in flight; close() hangs up."""

    def __init__(self, http: httpx.Client, prompt: str):
        body = {"prompt": prompt, "max_tokens": 3000, "ignore_eos": True, "stream": True}
        self._ctx = http.stream("POST", "/v1/completions", json=body)
        resp = self._ctx.__enter__()
        assert resp.status_code == 200
        # Keep the line iterator referenced: a dropped httpx iterator closes the connection.
        self._lines = resp.iter_lines()
        assert next(self._lines).startswith("data: ")

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)


def test_backpressure_gets_429_with_retry_after(limited_server, wait_for):
    """The limited server admits 2 requests / 200 prompt tokens in flight."""
    with limited_server.http() as http, limited_server.http() as other:
        first = _Held(http, "hold one")
        try:
            long_prompt = " ".join(["river"] * 300)
            resp = other.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1})
            error = assert_error(resp, 429, code="rate_limit_exceeded")
            assert error["type"] == "rate_limit_error" and "prompt tokens" in error["message"]
            assert resp.headers["Retry-After"] == "1"
            assert other.post("/v1/completions", json={"prompt": "short", "max_tokens": 1}).status_code == 200
            with limited_server.http() as third:
                second = _Held(third, "hold two")
                try:
                    resp = other.post("/v1/completions", json={"prompt": "short", "max_tokens": 1})
                    assert "sequences in flight" in assert_error(resp, 429)["message"]
                    # n counts: two sequences do not fit beside the two held, but they could later.
                    resp = other.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "n": 2})
                    assert_error(resp, 429)
                finally:
                    second.close()
        finally:
            first.close()
        # Hanging up released both slots.
        assert wait_for(
            lambda: other.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200,
            timeout=20,
        )
    assert wait_for(lambda: limited_server.metric("loom_requests_running") == 0, timeout=20)


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"prompt": ["a", "b", "c"]}, "prompt"), ({"n": 3}, "n"), ({"prompt": ["a", "b"], "n": 2}, "prompt")],
)
def test_request_larger_than_the_queue_is_400_not_429(limited_server, fields, param):
    """--max-waiting 2 counts sequences (n x prompts); a request over it alone could never be admitted,
    so retrying (429) would never help."""
    with limited_server.http() as http:
        resp = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, **fields})
        error = assert_error(resp, 400, param)
        assert "can never be admitted" in error["message"] and "Retry-After" not in resp.headers
        for fitting in ({"prompt": ["a", "b"]}, {"n": 2}):  # exactly the limit runs on an idle server
            resp = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, **fitting})
            assert resp.status_code == 200 and len(resp.json()["choices"]) == 2
        resp = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1, "n": 3})
        assert_error(resp, 400, "n")


def test_sigterm_drains_running_requests_then_exits_0(drain_server, wait_for):
    server = drain_server
    tokens = 2000  # long enough to still be running while the drain is probed
    body = {
        "prompt": "drain me",
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with (
        httpx.Client(base_url=server.url, timeout=120) as http,
        http.stream("POST", "/v1/completions", json=body) as resp,
    ):
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        server.proc.send_signal(signal.SIGTERM)
        # Draining: the socket is still open, but nothing new is admitted and readiness is off.
        with httpx.Client(base_url=server.url, timeout=10) as probe:
            assert wait_for(lambda: probe.get("/ready").status_code == 503, timeout=10)
            assert_error(probe.get("/ready"), 503, code="service_unavailable")
            assert_error(probe.post("/v1/completions", json=_completion()), 503)
            assert probe.get("/health").status_code == 200
        assert server.proc.poll() is None  # still serving the running request
        events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["usage"]["completion_tokens"] == tokens  # the running request was not cut short
    assert [
        json.loads(e)["choices"][0]["finish_reason"]
        for e in events[:-2]
        if json.loads(e)["choices"][0]["finish_reason"]
    ] == ["length"]
    assert server.proc.wait(timeout=60) == 0


def test_drain_timeout_answers_what_it_cuts_and_exits_nonzero(drain_cut_server, wait_for):
    """--drain-timeout 2 with two requests that need far longer: the stream ends with an error event and
    [DONE] (not a torn connection), the plain request gets a 503, and the exit status says work was lost."""
    from loom.entrypoints.server.cli import DRAIN_CUT_EXIT

    server = drain_cut_server
    body = {"prompt": "cut me", "max_tokens": 4000, "ignore_eos": True}
    plain: dict[str, httpx.Response] = {}

    def post_plain() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            plain["resp"] = c.post("/v1/completions", json=body)

    thread = threading.Thread(target=post_plain)
    thread.start()
    with (
        httpx.Client(base_url=server.url, timeout=120) as http,
        http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp,
    ):
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        assert wait_for(lambda: server.metric("loom_requests_running") == 2, timeout=30)
        server.proc.send_signal(signal.SIGTERM)
        events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    thread.join(timeout=60)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "service_unavailable" and "drain timeout" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])  # tokens, then the error, then [DONE]
    assert_error(plain["resp"], 503, code="service_unavailable")
    assert server.proc.wait(timeout=60) == DRAIN_CUT_EXIT
