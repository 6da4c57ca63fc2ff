"""Two `loom serve` processes sharing batch work through one Redis Streams queue (a real redis-server):
the batch created on one is answered by both, each custom_id exactly once."""

from __future__ import annotations

from tests.jobs.conftest import chat_line, jsonl, read_jsonl, wait_batch


def test_two_servers_share_one_batch_through_redis(launch_server, redis_url, tmp_path):
    common = ("--job-queue", redis_url, "--batch-max-concurrency", "2", "--no-response-cache")
    owner = launch_server("redis-a", "--state-dir", str(tmp_path / "a"), *common)
    helper = launch_server("redis-b", "--state-dir", str(tmp_path / "b"), *common)
    try:
        run_shared_batch(owner.wait_ready(), helper.wait_ready())
    finally:
        owner.stop()
        helper.stop()


def run_shared_batch(owner, helper) -> None:
    client = owner.openai()
    lines = [chat_line(f"r{i:02d}", f"Shared question {i}", max_tokens=12) for i in range(40)]
    file = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = wait_batch(
        client,
        client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
    )
    assert batch.status == "completed" and batch.request_counts.completed == 40
    output = read_jsonl(client.files.content(batch.output_file_id).text)
    assert [o["custom_id"] for o in output] == [line["custom_id"] for line in lines]
    ran_here = owner.metric("loom_batch_requests_finished_total")
    ran_there = helper.metric("loom_batch_requests_finished_total")
    assert ran_here > 0 and ran_there > 0, (ran_here, ran_there)
    assert ran_here + ran_there >= 40
