"""Scale-out on Ray Serve: routing policies over 2 replicas, 2x1 vs 1x2 threads, and router overhead.

    python benchmarks/scale_out.py [--json benchmarks/results/scale_out.json]

One local Ray cluster; for each setting a fresh Serve app (replicas start cold) gets the same seeded
`loom bench serve` agent workload (sessions that resend a shared system prompt and their history), at
a fixed concurrency. The prefix hit rate is the replicas' own counters (prompt tokens found in the
prefix cache / prompt tokens looked up), summed over replicas, for the timed run only.

Router overhead is measured two ways: the policy's decision (hashing + choosing) timed in-process
over the workload's requests, and the time-to-first-token of single short requests through the Ray
app (1 replica) minus the same through a plain `loom serve` with the same engine settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loom.bench.workloads import Session, WorkloadOptions, make_workload  # noqa: E402
from loom.config import EngineConfig  # noqa: E402
from loom.entrypoints.cli import build_parser  # noqa: E402
from loom.entrypoints.server.config import ServerConfig  # noqa: E402
from loom.models.tiny import make_tiny  # noqa: E402
from loom.serving.config import ScaleOutConfig  # noqa: E402
from loom.serving.policy import CacheAwarePolicy, RouteInfo  # noqa: E402
from loom.serving.prefix import block_hashes, request_text  # noqa: E402

MODEL = "loom-bench"


def bench_flags(args: argparse.Namespace, port: int) -> list[str]:
    return [
        "bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model", MODEL,
        "--workload", "agent", "--num-requests", str(args.num_requests), "--max-concurrency", str(args.concurrency),
        "--system-len", str(args.system_len), "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--num-turns", str(args.num_turns), "--ignore-eos", "--no-progress", "--warmup", "0",
    ]  # fmt: skip


def prefix_counters(app_name: str) -> tuple[float, float]:
    from ray import serve

    handle = serve.get_deployment_handle("replica-stable", app_name)
    stats = handle.broadcast("engine_stats").results()
    stats = stats.values() if isinstance(stats, dict) else stats
    return sum(s["prefix_cache_hits_total"] for s in stats), sum(
        s["prefix_cache_queries_total"] for s in stats
    )


def run_setting(name: str, scale: ScaleOutConfig, engine: EngineConfig, port: int, args) -> dict:
    from ray import serve

    from loom.bench.cli import run_serve_bench
    from loom.serving.app import build_app

    serve.run(build_app(scale, engine, ServerConfig(served_model_name=MODEL)), name=name, route_prefix="/")
    hits0, queries0 = prefix_counters(name)
    result = run_serve_bench(build_parser().parse_args(bench_flags(args, port)))
    hits1, queries1 = prefix_counters(name)
    serve.delete(name)
    row = {
        "setting": name,
        "prefix_hit_rate": (hits1 - hits0) / max(1.0, queries1 - queries0),
        "ttft_p50_ms": result["median_ttft_ms"],
        "ttft_p99_ms": result["p99_ttft_ms"],
        "output_tok_s": result["output_throughput"],
        "req_s": result["request_throughput"],
        "failed": result["failed"],
    }
    print(json.dumps(row), flush=True)
    return row


def ttfts(url: str, n: int) -> list[float]:
    """TTFT of n single, sequential, short streamed requests (distinct prompts: no response cache)."""
    out = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(n + 3):
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"ping {i}"}],
                "max_tokens": 2,
                "stream": True,
            }
            start = time.perf_counter()
            first = None
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    token = '"content":"' in line and '"content":""' not in line
                    if first is None and (token or "finish_reason" in line):
                        first = time.perf_counter() - start
            if i >= 3:  # the first few warm the path
                out.append(first * 1e3)
    return out


def policy_overhead(args) -> dict:
    """Per-request cost of the cache-aware decision (hash the request, choose, record), in-process."""
    opts = WorkloadOptions(system_len=args.system_len, input_len=args.input_len, num_turns=args.num_turns)
    workload = make_workload("agent", args.num_requests, 0, opts)
    bodies = []
    for item in workload.items:
        assert isinstance(item, Session)
        for turn in range(len(item.user_turns)):
            answers = ["an answer of some thirty words " * 4] * turn
            bodies.append({"messages": item.request(turn, answers).messages})
    policy = CacheAwarePolicy()
    times = []
    for i, body in enumerate(bodies * 5):
        start = time.perf_counter()
        route = RouteInfo(str(i), block_hashes=block_hashes(request_text(body), 64))
        policy.choose(route, {"a": i % 3, "b": (i + 1) % 3})
        times.append((time.perf_counter() - start) * 1e6)
    return {
        "decision_p50_us": statistics.median(times),
        "decision_p99_us": sorted(times)[int(0.99 * len(times))],
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--system-len", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=48)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--num-turns", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--overhead-requests", type=int, default=30)
    parser.add_argument("--json", dest="json_out")
    parser.add_argument("--parts", default="routing,threads,overhead", help="any of routing,threads,overhead")
    args = parser.parse_args()

    import ray
    from ray import serve

    parts = set(args.parts.split(","))
    load_before = os.getloadavg()
    model = make_tiny(Path(tempfile.mkdtemp()) / "model", size=args.size, seed=0)
    engine1 = EngineConfig(model=str(model), dtype=args.dtype, num_threads=1, num_blocks=2048)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows: list[dict] = []
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        if "routing" in parts:
            for routing in ("cache_aware", "round_robin", "power_of_two"):
                scale = ScaleOutConfig(replicas=2, routing=routing, replica_num_cpus=1)
                rows.append(run_setting(f"2x1-{routing}", scale, engine1, port, args))
                save(args, {"rows": rows, "load_before": load_before})
        if "threads" in parts:
            engine2 = EngineConfig(model=str(model), dtype=args.dtype, num_threads=2, num_blocks=4096)
            rows.append(
                run_setting("1x2", ScaleOutConfig(replicas=1, replica_num_cpus=2), engine2, port, args)
            )
            save(args, {"rows": rows, "load_before": load_before})
        if "overhead" in parts:
            from loom.serving.app import build_app

            app = build_app(ScaleOutConfig(replicas=1), engine1, ServerConfig(served_model_name=MODEL))
            serve.run(app, name="overhead", route_prefix="/")
            via_ray = ttfts(f"http://127.0.0.1:{port}", args.overhead_requests)
            serve.delete("overhead")
    finally:
        serve.shutdown()
        ray.shutdown()
    if "overhead" not in parts:
        return

    direct_port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "loom.entrypoints.cli",
        "--log-level",
        "WARNING",
        "serve",
        "--model",
        str(model),
    ]
    cmd += ["--dtype", args.dtype, "--num-threads", "1", "--num-blocks", "2048", "--port", str(direct_port)]
    cmd += ["--served-model-name", MODEL]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{direct_port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        direct = ttfts(f"http://127.0.0.1:{direct_port}", args.overhead_requests)
    finally:
        proc.terminate()
        proc.wait(30)
    overhead = {
        "ttft_p50_ms_direct": statistics.median(direct),
        "ttft_p50_ms_via_ray": statistics.median(via_ray),
        "added_p50_ms": statistics.median(via_ray) - statistics.median(direct),
        **policy_overhead(args),
    }
    print(json.dumps(overhead), flush=True)
    save(args, {"overhead": overhead, "overhead_load_before": load_before})


def save(args: argparse.Namespace, update: dict) -> None:
    """Merge `update` (and the machine load now) into the JSON result, so parts can run separately."""
    if not args.json_out:
        return
    path = Path(args.json_out)
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update(update, settings={k: v for k, v in vars(args).items() if k not in ("json_out", "parts")})
    result[f"load_after_{next(iter(update))}"] = os.getloadavg()
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
