"""Does a batch running beside interactive traffic slow the interactive requests? And how fast does a
batch go when interactive load is light?

One `loom serve` process (prefix caching off, so repeated prompts cost the same every phase), three
phases in one run:
1. interactive only: `loom bench serve`'s generator sends N chat requests at a fixed Poisson rate;
2. the same interactive load (same seed: same prompts, same arrival times) while a large batch (the
   Batch API, default throttle) runs beside it: TTFT p50/p99 against phase 1 (target <= 10% worse), and
   the batch lines answered meanwhile (batch throughput under light interactive load);
3. the rest of the batch with no interactive traffic: batch throughput alone, for reference.

    python benchmarks/batch_interference.py [--rate 1] [--num-requests 60] [--batch-lines 400]
        [--server-flag=--batch-max-concurrency=8 ...] [--json benchmarks/results/batch_interference.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from loom.bench.metrics import compute_metrics
from loom.bench.serve import ServeConfig, run_load
from loom.bench.workloads import Request, Workload, WorkloadOptions, random_workload, words
from loom.models.tiny import default_model_dir

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, args, state_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "loom.entrypoints.cli", "--log-level", "WARNING", "serve", "--model", model]
    cmd += ["--port", str(port), "--num-threads", str(args.threads), "--served-model-name", MODEL]
    cmd += [
        "--no-enable-prefix-caching",
        "--no-response-cache",
        "--state-dir",
        state_dir,
        "--max-waiting",
        "1000",
    ]
    cmd += args.server_flag
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)))
    url = f"http://127.0.0.1:{port}"
    for _ in range(1500):
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def interactive(url: str, args):
    opts = WorkloadOptions(input_len=args.input_len, output_len=args.output_len)
    load = random_workload(args.num_requests, opts, seed=args.seed)
    config = ServeConfig(url, MODEL, request_rate=args.rate, ignore_eos=True, seed=args.seed, progress=False)
    warm = Workload("warmup", [Request(prompt="warm up", max_tokens=4)])
    run = asyncio.run(run_load(config, load, warm))
    metrics = compute_metrics(run.records, run.duration)
    assert metrics.failed == 0, f"{metrics.failed} interactive requests failed"
    return metrics


def batch_file(args) -> bytes:
    rng = random.Random(args.seed + 1)
    lines = []
    for i in range(args.batch_lines):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": words(rng, args.input_len)}],
            "max_tokens": args.output_len,
            "temperature": 0,
            "ignore_eos": True,
        }
        lines.append(
            json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    return ("\n".join(lines) + "\n").encode()


def completed(client: openai.OpenAI, batch_id: str) -> int:
    return client.batches.retrieve(batch_id).request_counts.completed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the built-in tiny llama)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--rate", type=float, default=1.0, help="interactive requests per second")
    ap.add_argument("--num-requests", type=int, default=60, help="interactive requests per phase")
    ap.add_argument("--batch-lines", type=int, default=400)
    ap.add_argument("--input-len", type=int, default=128, help="prompt words of every request")
    ap.add_argument("--output-len", type=int, default=32, help="max_tokens of every request (ignore_eos)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-flag", action="append", default=[], help="extra `loom serve` flag (repeatable)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    model = args.model or str(default_model_dir())
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as state_dir:
        proc, url = start_server(model, args, state_dir)
        try:
            alone = interactive(url, args)
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            file = client.files.create(file=("batch.jsonl", batch_file(args)), purpose="batch")
            batch = client.batches.create(
                input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            t0 = time.perf_counter()
            beside = interactive(url, args)
            t1 = time.perf_counter()
            during = completed(client, batch.id)
            while (b := client.batches.retrieve(batch.id)).status not in (
                "completed",
                "failed",
                "expired",
                "cancelled",
            ):
                time.sleep(0.2)
            t2 = time.perf_counter()
            assert b.status == "completed" and b.request_counts.failed == 0, b
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    rest = args.batch_lines - during
    result = {
        "model": model,
        "rate": args.rate,
        "num_requests": args.num_requests,
        "batch_lines": args.batch_lines,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "server_flags": args.server_flag,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "ttft_ms": {
            "alone": {"p50": alone.ttft.median, "p99": alone.ttft.p99},
            "beside_batch": {"p50": beside.ttft.median, "p99": beside.ttft.p99},
        },
        "batch_lines_per_s": {
            "under_light_interactive_load": during / (t1 - t0),
            "alone": rest / (t2 - t1) if rest else None,
        },
        "batch_lines_during_interactive_phase": during,
    }
    print(
        f"\nmodel {model}; {args.num_requests} interactive chat requests at {args.rate}/s; batch of {args.batch_lines}"
    )
    print(f"load average before {load_before[0]:.2f}, after {result['loadavg_after'][0]:.2f}\n")
    print("| interactive TTFT (ms) | p50 | p99 |")
    print("|---|---:|---:|")
    for name, m in (("alone", alone), ("beside the batch", beside)):
        print(f"| {name} | {m.ttft.median:.0f} | {m.ttft.p99:.0f} |")
    print(
        f"| change | {beside.ttft.median / alone.ttft.median - 1:+.1%} | {beside.ttft.p99 / alone.ttft.p99 - 1:+.1%} |"
    )
    per_s = result["batch_lines_per_s"]
    print("\n| batch lines/s | |\n|---|---:|")
    print(f"| beside light interactive load | {per_s['under_light_interactive_load']:.2f} |")
    if per_s["alone"] is not None:
        print(f"| alone | {per_s['alone']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
