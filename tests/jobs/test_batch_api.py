"""The Files and Batch API on a real `loom serve`, driven by the real openai SDK: upload, create, poll,
download, list, cancel, and each kind of bad input (a 4xx naming the field, nothing stored half-way)."""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest

from tests.jobs.conftest import chat_line, jsonl, read_jsonl, wait_batch

PROMPTS = [f"Tell me about item {i} of the list." for i in range(12)]


@pytest.fixture(scope="module")
def servers(launch_server, tmp_path_factory):
    state = tmp_path_factory.mktemp("batch-api")
    started = {
        "main": launch_server("batch-main", "--state-dir", str(state / "main"), "--no-response-cache"),
        # One line at a time, so a cancel lands while most lines are still queued; a short idle wait, so
        # lines start between the preemption test's interactive requests.
        "slow": launch_server(
            "batch-slow",
            "--state-dir",
            str(state / "slow"),
            "--batch-max-concurrency",
            "1",
            "--batch-idle-s",
            "0.25",
            "--max-file-bytes",
            "4096",
        ),
        "quota": launch_server(
            "batch-quota", "--state-dir", str(state / "quota"), "--state-max-bytes", "262144"
        ),
    }
    yield {name: s.wait_ready() for name, s in started.items()} | {"state": state}
    for s in started.values():  # each idle server holds its model and KV pool: free them now
        s.stop()


@pytest.fixture(scope="module")
def client(servers) -> openai.OpenAI:
    return servers["main"].openai()


def answers(body: dict) -> list:
    """What a greedy answer is made of (ids and timestamps differ between two runs of one request)."""
    return [(c["message"]["content"], c["finish_reason"]) for c in body["choices"]], body["usage"][
        "completion_tokens"
    ]


def test_upload_create_poll_download(client):
    lines = [chat_line(f"req-{i}", p) for i, p in enumerate(PROMPTS)]
    uploaded = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
    assert client.files.retrieve(uploaded.id).filename == "in.jsonl"
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"k": "v"},
    )
    assert batch.status in ("validating", "in_progress") and batch.request_counts.total == len(lines)
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(lines), 0)
    assert batch.error_file_id is None and batch.metadata == {"k": "v"}
    output = read_jsonl(client.files.content(batch.output_file_id).text)
    assert [o["custom_id"] for o in output] == [line["custom_id"] for line in lines]
    for line, out in zip(lines, output, strict=True):
        assert out["error"] is None and out["response"]["status_code"] == 200
        alone = client.chat.completions.create(**line["body"]).model_dump()
        assert answers(out["response"]["body"]) == answers(alone)
    assert batch.id in [b.id for b in client.batches.list(limit=100)]
    assert {uploaded.id, batch.output_file_id} <= {f.id for f in client.files.list()}


def test_batch_progress_in_metrics(servers, client):
    server = servers["main"]
    lines = [chat_line(f"m{i}", p) for i, p in enumerate(PROMPTS[:3])]
    batch = client.batches.create(
        input_file_id=client.files.create(file=("m.jsonl", jsonl(lines)), purpose="batch").id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    assert wait_batch(client, batch.id).status == "completed"
    assert server.metric("loom_batches", 'status="completed"') >= 1
    assert server.metric("loom_batch_requests_finished_total") >= 3
    assert server.metric("loom_batch_requests_pending") == 0


def test_completions_batch_and_invalid_lines_reported_per_line(client):
    lines = [
        {
            "custom_id": "ok",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "Once upon", "max_tokens": 4, "temperature": 0},
        },
        {"custom_id": "no-prompt", "method": "POST", "url": "/v1/completions", "body": {"max_tokens": 4}},
        {
            "custom_id": "bad-range",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "x", "temperature": -3},
        },
        {"custom_id": "other-url", "method": "POST", "url": "/v1/chat/completions", "body": {"prompt": "x"}},
        {"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}},
    ]
    batch = client.batches.create(
        input_file_id=client.files.create(file=("c.jsonl", jsonl(lines)), purpose="batch").id,
        endpoint="/v1/completions",
        completion_window="24h",
    )
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 4)
    (ok,) = read_jsonl(client.files.content(batch.output_file_id).text)
    assert ok["custom_id"] == "ok" and ok["response"]["body"]["object"] == "text_completion"
    errors = {e["custom_id"]: e for e in read_jsonl(client.files.content(batch.error_file_id).text)}
    assert list(errors) == ["no-prompt", "bad-range", "other-url", "get"]
    assert errors["no-prompt"]["response"]["status_code"] == 400
    assert errors["no-prompt"]["response"]["body"]["error"]["param"] == "prompt"
    assert errors["bad-range"]["response"]["body"]["error"]["param"] == "temperature"
    assert errors["other-url"]["response"] is None and errors["other-url"]["error"]["param"] == "url"
    assert errors["get"]["error"]["param"] == "method"


def test_cancel_keeps_answered_lines_and_reports_the_rest(servers):
    client = servers["slow"].openai()
    lines = [chat_line(f"c{i}", p, max_tokens=24) for i, p in enumerate(PROMPTS * 2)]
    # Within the slow server's 4 KiB upload limit.
    file = client.files.create(file=("c.jsonl", jsonl(lines[:16])), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_batch(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    answered = read_jsonl(client.files.content(batch.output_file_id).text) if batch.output_file_id else []
    errors = read_jsonl(client.files.content(batch.error_file_id).text)
    ids = [o["custom_id"] for o in answered + errors]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines[:16]), "every custom_id exactly once"
    assert errors and all(e["error"]["code"] == "batch_cancelled" for e in errors)
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling an ended batch changes nothing


def test_interactive_requests_preempt_running_lines_which_run_again(servers):
    server = servers["slow"]
    client = server.openai()
    lines = [chat_line(f"p{i}", p, max_tokens=300, ignore_eos=True) for i, p in enumerate(PROMPTS[:4])]
    file = client.files.create(file=("p.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    before = server.metric("loom_batch_requests_preempted_total")
    for k in range(100):  # interactive requests until one lands while a line runs
        if server.metric("loom_batch_requests_preempted_total") > before:
            break
        # A new prompt each time: a repeated one would be answered from the response cache, never
        # reaching the engine (nor preempting anything).
        client.chat.completions.create(**chat_line("i", f"interactive {k}", max_tokens=2)["body"])
        time.sleep(0.3)
    assert server.metric("loom_batch_requests_preempted_total") > before
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 4
    output = read_jsonl(client.files.content(batch.output_file_id).text)
    assert [o["custom_id"] for o in output] == ["p0", "p1", "p2", "p3"]
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 300 for o in output)


def test_a_batch_past_its_window_expires(servers):
    client = servers["slow"].openai()
    lines = [chat_line(f"e{i}", p, max_tokens=24) for i, p in enumerate(PROMPTS)]
    file = client.files.create(file=("e.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="1s"
    )
    batch = wait_batch(client, batch.id)
    assert batch.status == "expired" and batch.expired_at is not None
    errors = read_jsonl(client.files.content(batch.error_file_id).text)
    answered = read_jsonl(client.files.content(batch.output_file_id).text) if batch.output_file_id else []
    assert sorted(o["custom_id"] for o in answered + errors) == sorted(line["custom_id"] for line in lines)
    assert any(e["error"] and e["error"]["code"] == "batch_expired" for e in errors)


def status_and_param(call) -> tuple[int, str | None]:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body.get("param") if isinstance(info.value.body, dict) else None


def test_bad_input_is_refused_naming_the_field(client, servers):
    before = {f.id for f in client.files.list()}
    assert status_and_param(
        lambda: client.files.create(file=("x.jsonl", b'{"custom_id": "a"}\nnot json\n'), purpose="batch")
    ) == (400, "file")
    dup = jsonl([chat_line("same", "a"), chat_line("same", "b")])
    assert status_and_param(lambda: client.files.create(file=("d.jsonl", dup), purpose="batch")) == (
        400,
        "file",
    )
    assert status_and_param(lambda: client.files.create(file=("p.jsonl", dup), purpose="fine-tune")) == (
        400,
        "purpose",
    )
    assert {f.id for f in client.files.list()} == before, "a refused upload stores nothing"
    assert status_and_param(
        lambda: client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    ) == (404, "input_file_id")
    good = client.files.create(file=("g.jsonl", jsonl([chat_line("x", "y")])), purpose="batch")
    assert status_and_param(
        lambda: client.batches.create(
            input_file_id=good.id, endpoint="/v1/embeddings", completion_window="24h"
        )
    ) == (400, "endpoint")
    assert status_and_param(
        lambda: client.batches.create(
            input_file_id=good.id, endpoint="/v1/completions", completion_window="soon"
        )
    ) == (400, "completion_window")
    assert status_and_param(lambda: client.batches.retrieve("batch_nope")) == (404, "batch_id")
    server = servers["main"]
    r = httpx.post(
        server.url + "/v1/batches",
        json={"input_file_id": good.id, "endpoint": "/v1/completions", "colour": 1},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "colour"
    assert client.files.delete(good.id).deleted and status_and_param(
        lambda: client.files.retrieve(good.id)
    ) == (404, "file_id")


def test_huge_upload_is_refused_before_its_body_is_read(servers):
    server = servers["slow"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 2147483648\r\n\r\n"
        )
        reply = sock.recv(65536).decode()  # answered with nothing of the 2 GB sent
    assert reply.startswith("HTTP/1.1 413"), reply

    # Without a Content-Length (chunked), the upload is cut off once it passes the limit.
    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        for _ in range(10):
            yield b"x" * 1024

    r = httpx.post(
        server.url + "/v1/files",
        content=chunks(),
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]


def test_full_state_dir_is_a_507_and_the_queue_stays_intact(servers):
    server = servers["quota"]
    client = server.openai()
    small = client.files.create(
        file=("s.jsonl", jsonl([chat_line("s0", "hello"), chat_line("s1", "world")])), purpose="batch"
    )
    big = jsonl([chat_line(f"b{i}", "z" * 2000) for i in range(150)])  # ~300 KB: over the 256 KiB quota
    r = httpx.post(server.url + "/v1/files", files={"file": ("big.jsonl", big)}, data={"purpose": "batch"})
    assert r.status_code == 507, r.text
    assert "quota" in r.json()["error"]["message"]
    assert [f.id for f in client.files.list()] == [small.id]
    files_dir = servers["state"] / "quota" / "files"
    assert sorted(p.name for p in files_dir.iterdir()) == [small.id], "nothing of the refused upload on disk"
    batch = client.batches.create(
        input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_batch(client, batch.id).status == "completed"
