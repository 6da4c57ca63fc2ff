"""Server throughput at saturation vs offline `LLM.generate`, same model, same requests, same run.

The workload is the throughput benchmark's: 48 requests, prompts of 16-256 random token ids, 16-128
output tokens each (ignore_eos, greedy). First loom offline (`LLM.generate`, all at once), then a
`loom serve` process with the same engine settings, loaded by `loom bench serve`'s generator with
every request at once (streaming, completions endpoint). Prints both output token throughputs, their
ratio (target >= 90%), and the server's TTFT / ITL / E2EL percentiles.

    python benchmarks/serving.py [--model DIR] [--dtype bfloat16] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from loom import LLM, SamplingParams
from loom.bench.metrics import compute_metrics
from loom.bench.serve import ServeConfig, run_load
from loom.bench.workloads import Request, Workload
from loom.models.tiny import default_model_dir

REPO = Path(__file__).resolve().parents[1]


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(3, 2048) for _ in range(rng.randint(16, 256))], rng.randint(16, 128))
        for _ in range(n)
    ]


def offline(model: str, args, reqs) -> float:
    llm = LLM(model, dtype=args.dtype, num_threads=args.threads, enable_prefix_caching=False)
    llm.generate([reqs[0][0]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
    t = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    del llm
    gc.collect()
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def online(model: str, args, reqs):
    port = free_port()
    cmd = [sys.executable, "-m", "loom.entrypoints.cli", "--log-level", "WARNING", "serve", "--model", model]
    cmd += [
        "--port",
        str(port),
        "--dtype",
        args.dtype,
        "--num-threads",
        str(args.server_threads or args.threads),
    ]
    cmd += ["--no-enable-prefix-caching", "--served-model-name", "bench", "--max-waiting", "1000"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        config = ServeConfig(url, "bench", endpoint="completions", ignore_eos=True, progress=False)
        items = [Request(prompt=p, max_tokens=m) for p, m in reqs]
        warm = Workload("warmup", [Request(prompt=reqs[0][0], max_tokens=4)])
        run = asyncio.run(run_load(config, Workload("throughput", items), warm))
        return compute_metrics(run.records, run.duration)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the built-in ~88M llama)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--server-threads", type=int, default=None, help="torch threads of the server (default --threads)"
    )
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or str(default_model_dir("llama", "small"))
    reqs = workload(args.num_requests, args.seed)
    off = offline(model, args, reqs)
    m = online(model, args, reqs)
    assert m.failed == 0, f"{m.failed} requests failed"
    print(f"\nmodel {model}, {args.dtype}, {args.threads} threads, {len(reqs)} requests, all at once\n")
    print("| | output tok/s | server / offline |")
    print("|---|---:|---:|")
    print(f"| offline LLM.generate | {off:.1f} | |")
    print(f"| loom serve (streaming) | {m.output_throughput:.1f} | {m.output_throughput / off:.1%} |")
    print("\n| server latency (ms) | mean | median | p90 | p99 |")
    print("|---|---:|---:|---:|---:|")
    for name in ("ttft", "itl", "e2el"):
        s = getattr(m, name)
        print(f"| {name.upper()} | {s.mean:.0f} | {s.median:.0f} | {s.p90:.0f} | {s.p99:.0f} |")


if __name__ == "__main__":
    main()
