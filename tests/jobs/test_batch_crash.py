"""A server killed with SIGKILL in the middle of a 200-request batch, then restarted on the same state
directory: the batch completes, and its output answers every custom_id exactly once, each with the body
the same request gets when sent alone."""

from __future__ import annotations

import signal
import time

from tests.jobs.conftest import chat_line, jsonl, read_jsonl, wait_batch

N = 200


def answers(body: dict):
    return [(c["message"]["content"], c["finish_reason"]) for c in body["choices"]], body["usage"]


def test_kill_9_mid_batch_then_restart_answers_each_custom_id_once(launch_server, tmp_path):
    state = tmp_path / "state"
    # No response cache anywhere: every answer compared below was computed by the model.
    flags = ("--state-dir", str(state), "--no-response-cache")
    server = launch_server("crash-1", *flags).wait_ready()
    reference = launch_server("crash-reference", "--no-response-cache")
    client = server.openai()
    lines = [
        chat_line(f"line-{i:03d}", f"Question {i}: what comes after {i}?", max_tokens=5) for i in range(N)
    ]
    file = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 300
    while client.batches.retrieve(batch.id).request_counts.completed < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    restarted = launch_server("crash-2", *flags).wait_ready()
    try:
        check_output(restarted, reference, batch.id, lines)
    finally:
        restarted.stop()
        reference.stop()


def check_output(restarted, reference, batch_id: str, lines: list[dict]) -> None:
    client = restarted.openai()
    done_at_kill = client.batches.retrieve(batch_id).request_counts.completed
    assert 20 <= done_at_kill < N, f"the kill should land mid-batch ({done_at_kill} of {N} done)"
    batch = wait_batch(client, batch_id, timeout=600)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        N,
        N,
        0,
    )
    assert batch.error_file_id is None
    output = read_jsonl(client.files.content(batch.output_file_id).text)
    assert len(output) == N
    assert [o["custom_id"] for o in output] == [line["custom_id"] for line in lines], (
        "each exactly once, in order"
    )
    ref = reference.wait_ready().openai()
    for line, out in zip(lines, output, strict=True):
        alone = ref.chat.completions.create(**line["body"]).model_dump()
        assert answers(out["response"]["body"])[0] == answers(alone)[0], line["custom_id"]
        assert out["response"]["body"]["usage"]["completion_tokens"] == alone["usage"]["completion_tokens"]
