"""`loom bench serve` against a real `loom serve` of the tiny model on loopback."""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from pathlib import Path

import httpx
import pytest

from loom.bench.cli import main
from loom.bench.metrics import compute_metrics
from loom.bench.report import REQUEST_SCHEMA, RESULT_SCHEMA
from loom.bench.serve import LoadGenerator, ServeConfig, _probe_models, run_load
from loom.bench.workloads import Request, WorkloadOptions, make_workload


@pytest.fixture(scope="module")
def server(launch_server):
    return launch_server("bench", "--num-threads", "1").wait_ready()


def config(server, **kwargs) -> ServeConfig:
    return ServeConfig(base_url=server.url, model=server.model, progress=False, **kwargs)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_metrics_match_what_the_server_reported(server, endpoint):
    # Completions sends token-id prompts, chat sends text: both prompt kinds and both endpoints.
    vocab = 1000 if endpoint == "completions" else None
    opts = WorkloadOptions(input_len=16, output_len=6, range_ratio=0.5, token_ids_vocab=vocab)
    workload = make_workload("random", 6, seed=1, opts=opts)
    generated_before = server.metric("loom_generation_tokens_total")
    cfg = config(server, endpoint=endpoint, ignore_eos=True, max_concurrency=3, request_rate=50.0)
    run = asyncio.run(run_load(cfg, workload))

    assert run.extra_body == {"ignore_eos": True, "cache": False}  # loom's response cache bypassed
    for r in run.records:
        assert r.success, r.error
        assert r.usage_reported and r.output_tokens == r.request.max_tokens
        assert 0 < r.ttft <= r.e2el and r.tpot >= 0
        assert r.prompt_tokens == len(r.request.prompt) if vocab else r.prompt_tokens > 8
        assert r.text
        assert len(r.itl) <= r.output_tokens - 1 and all(gap >= 0 for gap in r.itl)
    assert len({r.request.max_tokens for r in run.records}) > 1
    total = sum(r.output_tokens for r in run.records)
    assert server.metric("loom_generation_tokens_total") - generated_before == total

    m = compute_metrics(run.records, run.duration, {"e2el": 60_000})
    assert (m.completed, m.failed, m.total_output_tokens) == (6, 0, total)
    assert m.request_goodput == pytest.approx(m.request_throughput) and m.request_throughput > 0
    assert m.ttft.p99 <= m.e2el.p99 and m.tpot.mean >= 0 and m.itl.count > 0
    assert 0 < run.duration and max(r.start + r.e2el for r in run.records) <= run.duration


def test_agent_turn_is_sent_after_the_previous_one_with_its_answer(server):
    opts = WorkloadOptions(num_turns=3, system_len=40, input_len=6, output_len=5)
    workload = make_workload("agent", 6, seed=0, opts=opts)
    run = asyncio.run(run_load(config(server, ignore_eos=True), workload))
    assert [(r.request.session_id, r.request.turn) for r in run.records] == [
        (s, t) for s in (0, 1) for t in range(3)
    ]
    for prev, nxt in zip(run.records, run.records[1:], strict=False):
        if nxt.request.turn == 0:
            continue
        assert prev.success and nxt.success
        assert nxt.start >= prev.start + prev.e2el
        assert nxt.request.messages[-2] == {"role": "assistant", "content": prev.text}
        assert nxt.prompt_tokens > prev.prompt_tokens  # the history grows
    # The two sessions ran side by side: session 1's first turn did not wait for session 0 to finish.
    assert run.records[3].start < run.records[2].start


def test_dag_programs_run_through_the_agent_runtime_and_are_measured(server):
    opts = WorkloadOptions(num_branches=2, prefix_len=64, input_len=8, output_len=4)
    workload = make_workload("dag", 6, seed=0, opts=opts)
    warmup = make_workload("dag", 1, seed=1, opts=opts)  # as the CLI makes it: one first-branch call
    generated_before = server.metric("loom_generation_tokens_total")
    run = asyncio.run(run_load(config(server, ignore_eos=True, max_concurrency=2), workload, warmup))

    assert all(r.success for r in run.records), [r.error for r in run.records]
    assert [(r.request.session_id, r.request.turn) for r in run.records] == [
        (p, t) for p in (0, 1) for t in (0, 0, 1)
    ]
    for program, records in zip(workload.items, (run.records[:3], run.records[3:]), strict=True):
        *branches, summary = records
        assert sorted(b.request.messages[-1]["content"] for b in branches) == sorted(program.questions)
        assert all(b.request.messages[0]["content"] == program.document for b in branches)
        assert all(b.prompt_tokens > 64 for b in branches)  # the document is in every branch prompt
        # The fan-in waits for every branch and reads each answer.
        assert summary.start >= max(b.start + b.e2el for b in branches)
        assert all(b.text in summary.request.messages[-1]["content"] for b in branches)
    assert all(r.usage_reported and r.output_tokens == 4 for r in run.records)
    total = sum(r.output_tokens for r in run.records)
    assert server.metric("loom_generation_tokens_total") - generated_before == total + 4 == 28
    m = compute_metrics(run.records, run.duration)
    assert (m.completed, m.failed) == (6, 0) and m.ttft.count == 6
    # Each program's release reached the server: nothing stays pinned for a next call (the TTL is 30 s).
    deadline = time.monotonic() + 5
    while server.metric("loom_kv_pinned_blocks") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("loom_kv_pinned_blocks") == 0


def test_program_id_is_sent_to_loom_only(server):
    request = Request(messages=[{"role": "user", "content": "hi"}], program_id="p-1")

    async def bodies() -> tuple[dict, dict]:
        async with httpx.AsyncClient() as client:
            gen = LoadGenerator(config(server), client)
            before = gen.body(request)
            await _probe_models(gen)
            return before, gen.body(request)

    unknown, loom = asyncio.run(bodies())
    assert "program_id" not in unknown and loom["program_id"] == "p-1"


def test_dag_needs_the_chat_endpoint():
    argv = ["serve", "--base-url", "http://127.0.0.1:9", "--model", "m", "--endpoint", "completions"]
    with pytest.raises(SystemExit, match="dag workload .* needs --endpoint chat"):
        main(argv + ["--workload", "dag", "--num-requests", "3", "--no-progress"])


def test_failed_requests_are_counted_not_measured(server):
    workload = make_workload("random", 3, seed=0, opts=WorkloadOptions(input_len=4, output_len=2))
    run = asyncio.run(run_load(ServeConfig(server.url, "no-such-model", progress=False), workload))
    assert all(not r.success and r.error.startswith("HTTP 4") for r in run.records)
    m = compute_metrics(run.records, run.duration)
    assert (m.completed, m.failed, m.ttft.mean) == (0, 3, None)


def test_a_failed_branch_leaves_its_summary_unsent(server):
    opts = WorkloadOptions(num_branches=2, prefix_len=8, input_len=4, output_len=2)
    workload = make_workload("dag", 3, seed=0, opts=opts)
    run = asyncio.run(run_load(ServeConfig(server.url, "no-such-model", progress=False), workload))
    *branches, summary = run.records
    assert all(not b.success and b.error.startswith("HTTP 4") for b in branches)
    assert summary.request is None and summary.error.startswith("not sent")
    assert compute_metrics(run.records, run.duration).failed == 3


def test_cli_writes_the_documented_json_and_png(server, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    main(
        ["serve", "--base-url", server.url + "/v1", "--model", server.model, "--endpoint", "completions"]
        + ["--workload", "shared-prefix", "--num-groups", "2", "--prefix-len", "40", "--input-len", "5"]
        + ["--output-len", "4", "--num-requests", "4", "--warmup", "1", "--request-rate", "100"]
        + ["--burstiness", "0.5", "--ignore-eos", "--goodput", "ttft:60000", "e2el:60000"]
        + ["--no-progress", "--json", str(out), "--png", str(png)]
    )
    result = json.loads(out.read_text())
    assert list(result) == list(RESULT_SCHEMA)
    assert all(list(r) == list(REQUEST_SCHEMA) for r in result["requests"])
    assert (result["completed"], result["failed"], result["num_requests"], result["warmup"]) == (4, 0, 4, 1)
    assert len(result["requests"]) == 4  # the warm-up request is not in the results
    assert result["total_output_tokens"] == 16 and result["request_goodput"] == result["request_throughput"]
    assert result["goodput_slos_ms"] == {"ttft": 60000.0, "e2el": 60000.0}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_cli_exits_non_zero_when_requests_fail(server, tmp_path):
    """A prompt over the model's context is a failed request, and the run says so in its exit status
    (after writing the JSON, which holds each request's error)."""
    out = tmp_path / "r.json"
    argv = ["serve", "--base-url", server.url, "--model", server.model, "--workload", "random"]
    argv += ["--input-len", "6000", "--output-len", "2", "--num-requests", "2", "--warmup", "0"]
    with pytest.raises(SystemExit, match="2 of 2 requests failed; first error: HTTP 400"):
        main(argv + ["--no-progress", "--json", str(out)])
    assert json.loads(out.read_text())["failed"] == 2


def test_the_readme_bench_command_fits_the_tiny_model(server, tmp_path):
    """The README's agent-workload command, with fewer requests and no rate limit: every request succeeds."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    command = next(c for b in readme.split("```bash\n") if "loom bench serve" in (c := b.split("```")[0]))
    argv = shlex.split(command.replace("\\\n", " "))[2:]  # after `loom bench`
    for flag, value in (("--base-url", server.url), ("--model", server.model), ("--num-requests", "8"),
                        ("--request-rate", "inf"), ("--json", str(tmp_path / "r.json")),
                        ("--png", str(tmp_path / "r.png"))):  # fmt: skip
        argv[argv.index(flag) + 1] = value
    i = argv.index("--api-key")
    del argv[i : i + 2]  # this server has no key
    main(argv + ["--no-progress"])
    assert json.loads((tmp_path / "r.json").read_text())["failed"] == 0
