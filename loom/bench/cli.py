"""`loom bench`: benchmarks users run to compare loom with other engines.

`loom bench serve` drives any OpenAI-compatible server (loom, vLLM, SGLang, llama.cpp's server, a hosted
API) with a seeded streaming workload and reports vLLM benchmark_serving's metrics (TTFT, TPOT, ITL,
E2EL, throughput, goodput) as a table, a JSON file (schema: loom.bench.report.RESULT_SCHEMA) and a PNG.

    loom bench serve --base-url http://127.0.0.1:8000 --model NAME --workload sharegpt-like \\
        --request-rate 4 --num-requests 200 --goodput ttft:500 tpot:50 --json out.json --png out.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
from dataclasses import fields
from typing import Any

from loom.bench.metrics import compute_metrics, parse_goodput
from loom.bench.report import build_result, format_table, plot_result, write_json
from loom.bench.serve import ENDPOINTS, BenchError, ServeConfig, run_load, scrape_loom_counters
from loom.bench.workloads import WORKLOADS, WorkloadOptions, make_workload
from loom.config import add_config_args, field_docs
from loom.errors import InvalidRequest


def add_bench_parser(subparsers: Any) -> Any:
    """Add `loom bench` to the `loom` CLI's subparsers; returns bench's own subparsers (for more benches)."""
    bench = subparsers.add_parser(
        "bench",
        help="benchmark loom or any OpenAI-compatible server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = bench.add_subparsers(dest="bench_command", required=True)
    add_serve_bench_parser(sub)
    from loom.bench import throughput

    parser = sub.add_parser(
        "throughput",
        help="offline throughput: loom vs HF transformers, with the measured roofline",
        description=throughput.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    throughput.add_arguments(parser)
    parser.set_defaults(func=throughput.run)
    return sub


def add_serve_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    doc = field_docs(ServeConfig)
    p = subparsers.add_parser(
        "serve",
        help="online serving benchmark against an OpenAI-compatible server",
        description="Stream a seeded workload to an OpenAI-compatible server and report TTFT, TPOT, ITL, "
        "E2EL, throughput and goodput (vLLM benchmark_serving's metric names).",
    )
    p.add_argument("--base-url", required=True, help=doc["base_url"])
    p.add_argument("--model", required=True, help=doc["model"])
    p.add_argument("--api-key", help=doc["api_key"])
    p.add_argument("--endpoint", choices=ENDPOINTS, default="chat", help=doc["endpoint"])
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help=doc["request_rate"] + " (default: inf)"
    )
    p.add_argument("--max-concurrency", type=int, help=doc["max_concurrency"])
    p.add_argument("--burstiness", type=float, default=1.0, help=doc["burstiness"] + " (default: 1)")
    p.add_argument(
        "--num-requests",
        type=int,
        default=100,
        help="requests in the timed run; dag: rounded up to whole programs (default: 100)",
    )
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests sent first (default: 1)")
    p.add_argument("--workload", default="random", help=f"one of {', '.join(WORKLOADS)} (default: random)")
    p.add_argument("--seed", type=int, default=0, help=doc["seed"] + " (default: 0)")
    p.add_argument(
        "--goodput", nargs="+", metavar="NAME:MS", help="SLOs for goodput: any of ttft:MS tpot:MS e2el:MS"
    )
    p.add_argument("--temperature", type=float, default=0.0, help=doc["temperature"])
    p.add_argument("--ignore-eos", action="store_true", help=doc["ignore_eos"])
    p.add_argument("--extra-body", type=json.loads, default={}, metavar="JSON", help=doc["extra_body"])
    p.add_argument("--timeout", type=float, default=600.0, help=doc["timeout"] + " (default: 600)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help=doc["progress"])
    p.add_argument("--json", dest="json_out", metavar="PATH", help="write the result JSON here")
    p.add_argument("--png", dest="png_out", metavar="PATH", help="write latency CDFs and throughput here")
    add_config_args(p, WorkloadOptions, "workload shape")
    p.set_defaults(func=cmd_bench_serve)
    return p


def run_serve_bench(args: argparse.Namespace) -> dict:
    """Run `loom bench serve` from parsed flags; returns the result (RESULT_SCHEMA)."""
    config = ServeConfig(
        base_url=args.base_url,
        model=args.model,
        api_key=args.api_key,
        endpoint=args.endpoint,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        extra_body=args.extra_body,
        timeout=args.timeout,
        progress=args.progress,
    )
    slos = parse_goodput(args.goodput)
    opts = WorkloadOptions(**{f.name: getattr(args, f.name) for f in fields(WorkloadOptions)})
    workload = make_workload(args.workload, args.num_requests, args.seed, opts)
    # Warm-up requests come from another seed, so they warm the server without caching the timed prompts.
    warm_spec = "random" if args.workload.startswith("jsonl:") else args.workload
    warmup = make_workload(warm_spec, args.warmup, args.seed + 1, opts) if args.warmup > 0 else None
    before = scrape_loom_counters(config)
    run = asyncio.run(
        run_load(config, workload, warmup, on_timed_start=lambda: before.update(scrape_loom_counters(config)))
    )
    after = scrape_loom_counters(config)
    server_stats = {k: after[k] - before.get(k, 0) for k in after} if after else None
    metrics = compute_metrics(run.records, run.duration, slos)
    settings = {
        "base_url": config.base_url,
        "model": config.model,
        "endpoint": config.endpoint,
        "workload": workload.name,
        "num_requests": workload.num_requests,
        "warmup": args.warmup,
        "request_rate": config.request_rate,
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        "seed": config.seed,
        "temperature": config.temperature,
        "ignore_eos": config.ignore_eos,
        "extra_body": run.extra_body,
        "goodput_slos_ms": slos,
        "server_stats": server_stats,
    }
    return build_result(settings, metrics, run.records)


def cmd_bench_serve(args: argparse.Namespace) -> None:
    # httpx logs every request at INFO: thousands of lines over a benchmark.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        result = run_serve_bench(args)
    except (BenchError, InvalidRequest, OSError) as e:
        raise SystemExit(f"loom bench serve: {e}") from e
    print(format_table(result))
    if args.json_out:
        write_json(result, args.json_out)
    if args.png_out:
        plot_result(result, args.png_out)
    if result["failed"]:
        # A benchmark that lost requests measured something else than it says: fail loudly (after writing
        # the results, which hold each failure's error).
        first = next((r["error"] for r in result.get("requests", []) if r.get("error")), None)
        raise SystemExit(
            f"loom bench serve: {result['failed']} of {result['num_requests']} requests failed"
            + (f"; first error: {first}" if first else "")
        )


def main(argv: list[str] | None = None) -> None:
    """`python -m loom.bench.cli serve ...`, the same as `loom bench serve ...`."""
    parser = argparse.ArgumentParser(prog="loom bench")
    sub = parser.add_subparsers(dest="bench_command", required=True)
    add_serve_bench_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
