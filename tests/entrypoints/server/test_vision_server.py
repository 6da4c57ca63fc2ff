"""A real `loom serve` of the tiny GLM-4.1V driven exactly the way Open-AutoGLM's phone agent drives its
server: the openai SDK, streaming chat completions with its sampling settings, a fresh screenshot as an
image_url data URL in every step's user message and the previous step's screenshot removed, with the
server flags its README gives vLLM. Each step streams content; later steps reuse the cached prefix. Then
bad image input: 400s naming the field, the server unharmed, nothing fetched."""

from __future__ import annotations

import base64

import pytest

from loom.bench.screens import data_url, screenshot

SYSTEM = "You are a phone agent. The task: open Settings and turn on Wi-Fi. " * 8


@pytest.fixture(scope="module")
def vision_server(launch_server, tiny_model_dir, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    (media / "ok.png").write_bytes(base64.b64decode(data_url(screenshot(90, 160, 5)).split(",", 1)[1]))
    server = launch_server(
        "vision",
        "--max-model-len", "2048",
        "--limit-mm-per-prompt", '{"image": 2}',
        "--mm-processor-kwargs", '{"max_pixels": 100000}',
        "--chat-template-content-format", "string",
        "--allowed-local-media-path", str(media),
        model_dir=tiny_model_dir("glm4v"),
    )  # fmt: skip
    return server.wait_ready(), media


def _step_message(step: int, with_image: bool) -> dict:
    text = f"Step {step}: what do you do next?"
    if not with_image:
        return {"role": "user", "content": text}
    image = {"type": "image_url", "image_url": {"url": data_url(screenshot(180, 400, seed=step))}}
    return {"role": "user", "content": [image, {"type": "text", "text": text}]}


def test_open_autoglm_session(vision_server):
    server, _ = vision_server
    client = server.openai()
    messages = [{"role": "system", "content": SYSTEM}]
    cached = []
    for step in range(4):
        if step:  # the agent strips the screenshot of the step before
            messages[-2] = _step_message(step - 1, with_image=False)
        messages.append(_step_message(step, with_image=True))
        stream = client.chat.completions.create(
            model=server.model,
            messages=messages,
            stream=True,
            max_tokens=24,
            temperature=0,
            top_p=0.85,
            frequency_penalty=0.2,
            stream_options={"include_usage": True},
        )
        content, usage = "", None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                content += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        assert content, f"step {step} streamed no content"
        assert usage.prompt_tokens > 40  # the screenshot's placeholders count as prompt tokens
        cached.append(usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": content})
    assert cached[0] == 0
    # Everything before the newest screenshot is reused: the system prompt and the text history.
    assert all(c >= 16 * (len(SYSTEM) // 80) for c in cached[1:]), cached
    assert server.metric("loom_images_encoded_total") == 4
    assert server.metric("loom_prefix_cache_hits_total") > 0


@pytest.mark.parametrize(
    "part, field_suffix",
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "image_url"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}}, "image_url"),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "image_url"),
        ({"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}, "image_url"),
        ({"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}, "image_url"),
    ],
)  # fmt: skip
def test_bad_images_are_400s_naming_the_part(vision_server, part, field_suffix):
    server, _ = vision_server
    with server.http() as http:
        body = {"model": server.model, "max_tokens": 4, "messages": [{"role": "user", "content": [part]}]}
        resp = http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == f"messages[0].content[0].{field_suffix}"
        assert http.get("/ready").status_code == 200


def test_image_limits_roles_and_local_files(vision_server):
    server, media = vision_server
    ok = {"type": "image_url", "image_url": {"url": f"file://{media}/ok.png"}}
    with server.http() as http:

        def chat(messages):
            return http.post(
                "/v1/chat/completions", json={"model": server.model, "max_tokens": 4, "messages": messages}
            )

        assert chat([{"role": "user", "content": [ok, {"type": "text", "text": "hi"}]}]).status_code == 200
        resp = chat([{"role": "user", "content": [ok, ok, ok]}])  # --limit-mm-per-prompt image 2
        assert resp.status_code == 400 and "limit-mm-per-prompt" in resp.json()["error"]["message"]
        resp = chat([{"role": "system", "content": [ok]}, {"role": "user", "content": "hi"}])
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages[0].content[0].image_url"
        (media / "link.png").symlink_to("/etc/hostname")
        resp = chat(
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": f"file://{media}/link.png"}}],
                }
            ]
        )
        assert resp.status_code == 400


def test_text_only_model_refuses_images(server):
    with server.http() as http:
        part = {"type": "image_url", "image_url": {"url": data_url(screenshot(32, 32, 1))}}
        body = {"model": server.model, "max_tokens": 4, "messages": [{"role": "user", "content": [part]}]}
        resp = http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 400 and "text only" in resp.json()["error"]["message"]


def test_the_readme_screenshot_snippet_runs(vision_server, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    server, media = vision_server
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if 'open("screen.png"' in b)
    code = code.replace("http://127.0.0.1:8000", server.url).replace('"autoglm-phone-9b"', repr(server.model))
    code = code.replace("max_tokens=3000", "max_tokens=8")  # the tiny model's context is 2048 here
    monkeypatch.chdir(tmp_path)
    (tmp_path / "screen.png").write_bytes((media / "ok.png").read_bytes())
    exec(compile(code, "README:screen.png", "exec"), {})  # noqa: S102 - the README's own code
