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
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from loom.bench import compare, peers
from loom.bench.compare_report import format_compare
from loom.bench.metrics import compute_metrics, parse_goodput
from loom.bench.report import build_result, format_table, plot_result, write_json
from loom.bench.serve import ENDPOINTS, BenchError, ServeConfig, run_load, scrape_loom_counters
from loom.bench.workloads import WORKLOADS, WorkloadOptions, make_workload
from loom.config import add_config_args, field_docs
from loom.errors import InvalidRequest

DTYPES = {"float32": "f32", "bfloat16": "bf16"}
"""loom's dtypes here, and the GGUF type of the same precision."""


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
    add_llama_server_parser(sub)
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


LLAMA_SERVER_DOC = """llama.cpp's server as a peer of `loom serve`, built from llama-cpp-python's source distribution
(PyPI is the only place anything is downloaded from), on the same checkpoint converted to GGUF.

    loom bench llama-server build                  # once: ~15 min on 2 cores, cached in ~/.cache/loom/llama.cpp
    loom bench llama-server gguf --types f32,bf16,q8_0,q4_0
    loom bench llama-server compare --dtype bfloat16 --concurrency 16 --json out.json
    loom bench llama-server compare --loom-args='--quantization int8' --gguf-type q8_0 --concurrency 1
"""


def add_llama_server_parser(subparsers: Any) -> argparse.ArgumentParser:
    from loom.bench import llama_server

    p = subparsers.add_parser(
        "llama-server",
        help="build llama.cpp's server, make GGUFs, and compare loom serve with it",
        description=LLAMA_SERVER_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="llama_server_command", required=True)
    version = f"llama-cpp-python version (default: the installed one, else {llama_server.DEFAULT_VERSION})"

    b = sub.add_parser("build", help="build llama-server and llama-quantize (once per version)")
    b.add_argument(
        "--src", type=Path, help="llama-cpp-python's sdist or source directory (default: pip download)"
    )
    b.add_argument("--version", dest="llama_cpp_version", help=version)
    b.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default: 2)")
    b.add_argument("--nice", type=int, default=10, help="niceness of the compilers (default: 10)")
    b.set_defaults(func=cmd_llama_server_build)

    g = sub.add_parser("gguf", help="convert a checkpoint to GGUF at each type (cached)")
    g.add_argument("--model", type=Path, help="HF model directory (default: the built-in small llama)")
    g.add_argument(
        "--types", default="f32,bf16,q8_0,q4_0", help="comma-separated (default: f32,bf16,q8_0,q4_0)"
    )
    g.add_argument("--version", dest="llama_cpp_version", help=version)
    g.add_argument("--threads", type=int, default=2, help="llama-quantize threads (default: 2)")
    g.set_defaults(func=cmd_llama_server_gguf)

    c = sub.add_parser(
        "compare",
        help="loom serve vs llama-server: same requests, alternating rounds, one table of ratios",
        description=compare.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--model", type=Path, help="HF model directory (default: the built-in small llama)")
    c.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="loom's --dtype (default: bfloat16)")
    c.add_argument(
        "--gguf-type",
        help="llama.cpp's weights: f32, bf16, q8_0, q4_0, ... (default: f32 or bf16, as --dtype)",
    )
    c.add_argument("--gguf", type=Path, help="a GGUF file to serve instead of converting --model")
    c.add_argument("--threads", type=int, default=1, help="each server's threads (default: 1)")
    c.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="requests in flight, and llama-server's --parallel (default: 16)",
    )
    c.add_argument("--num-requests", type=int, default=48, help="requests per round (default: 48)")
    c.add_argument("--rounds", type=int, default=3, help="timed rounds per server (default: 3)")
    c.add_argument(
        "--workload", default="random", help="random, sharegpt-like or shared-prefix (default: random)"
    )
    c.add_argument("--seed", type=int, default=0, help="round r sends workload seed SEED + r (default: 0)")
    c.add_argument("--warmup", type=int, help="warm-up requests per server (default: the concurrency)")
    c.add_argument("--agreement-prompts", type=int, default=4, help="greedy prompts compared (default: 4)")
    c.add_argument("--agreement-tokens", type=int, default=32, help="tokens each (default: 32)")
    c.add_argument("--loom-args", default="", help="more `loom serve` flags, e.g. '--quantization int8'")
    c.add_argument("--llama-server-args", default="", help="more llama-server flags (they come last)")
    c.add_argument("--llama-server", type=Path, help="the llama-server binary (default: the cached build)")
    c.add_argument("--version", dest="llama_cpp_version", help=version)
    c.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to start a server or finish a request"
    )
    c.add_argument("--log-dir", type=Path, help="server logs (default: a new temporary directory)")
    c.add_argument("--json", dest="json_out", type=Path, help="write the result JSON here")
    c.set_defaults(func=cmd_llama_server_compare)
    return p


def cmd_llama_server_build(args: argparse.Namespace) -> None:
    from loom.bench import llama_server

    try:
        b = llama_server.build(args.llama_cpp_version, args.src, jobs=args.jobs, nice=args.nice)
    except llama_server.LlamaServerError as e:
        raise SystemExit(f"loom bench llama-server build: {e}") from e
    info = b.info
    print(f"llama.cpp {b.version}: {b.server} and {b.quantize}")
    print(f"built in {info.get('seconds', '?')} s; {info.get('isa', '')}")


def cmd_llama_server_gguf(args: argparse.Namespace) -> None:
    from loom.bench import gguf, llama_server

    try:
        types = llama_server.gguf_types(args.types)
        build = llama_server.require_build(args.llama_cpp_version)
        model_dir = _model_dir(args.model)
        for t in types:
            print(f"{t}: {llama_server.make_gguf(model_dir, t, build, args.threads)}")
    except (llama_server.LlamaServerError, gguf.GGUFError) as e:
        raise SystemExit(f"loom bench llama-server gguf: {e}") from e


def _model_dir(model: Path | None) -> Path:
    if model is not None:
        return model
    from loom.models.tiny import default_model_dir

    return default_model_dir("llama", "small")


def compare_plan(args: argparse.Namespace) -> tuple[compare.CompareSettings, str, list[str], list[str]]:
    """Validate `compare`'s flags before anything starts: (settings, GGUF type, loom args, llama-server
    args)."""
    from loom.bench import llama_server

    if args.threads < 1:
        raise InvalidRequest(f"--threads must be >= 1, got {args.threads}", param="threads")
    settings = compare.CompareSettings(
        workload=args.workload,
        num_requests=args.num_requests,
        rounds=args.rounds,
        concurrency=args.concurrency,
        seed=args.seed,
        warmup=args.warmup,
        agreement_prompts=args.agreement_prompts,
        agreement_tokens=args.agreement_tokens,
        timeout=args.timeout,
    )
    gguf_type = args.gguf_type or DTYPES[args.dtype]
    try:
        (gguf_type,) = llama_server.gguf_types(gguf_type)
    except (ValueError, llama_server.LlamaServerError) as e:
        raise InvalidRequest(f"--gguf-type: {e}", param="gguf_type") from e
    if args.gguf is not None and not args.gguf.is_file():
        raise InvalidRequest(f"--gguf {args.gguf}: no such file", param="gguf")
    try:
        loom_args, llama_args = shlex.split(args.loom_args), shlex.split(args.llama_server_args)
    except ValueError as e:
        raise InvalidRequest(f"--loom-args / --llama-server-args: {e}") from e
    return settings, gguf_type, loom_args, llama_args


def loom_name(dtype: str, loom_args: list[str]) -> str:
    """The loom peer's name in the table: its dtype and, when given, its quantization (as `loom serve`
    reads the flag: `--quantization int8` or `--quantization=int8`)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--quantization")
    quant = flags.parse_known_args(loom_args)[0].quantization
    return f"loom ({dtype}{', ' + quant if quant else ''})"


def cmd_llama_server_compare(args: argparse.Namespace) -> None:
    import tempfile

    from loom.bench import gguf, llama_server
    from loom.models.config import ModelConfig
    from loom.tokenizer import Tokenizer

    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings, gguf_type, loom_args, llama_args = compare_plan(args)
        model_dir = _model_dir(args.model)
        cfg = ModelConfig.from_dir(model_dir)
        tokenizer = Tokenizer(model_dir)
        build = (
            None if args.llama_server and args.gguf else llama_server.require_build(args.llama_cpp_version)
        )
        server = args.llama_server or build.server
        gguf_file = args.gguf or llama_server.make_gguf(model_dir, gguf_type, build)
        log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="loom-compare-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        plan = compare.plan_workloads(settings, cfg.vocab_size, cfg.max_position_embeddings)
        opts = llama_server.ServerOptions(
            threads=args.threads,
            parallel=settings.concurrency,
            ctx_per_slot=plan.longest,
            kv_type=llama_server.kv_type_for(gguf_type),
            alias="model",
            extra=tuple(llama_args),
        )
        servers = [
            peers.loom_peer(
                loom_name(args.dtype, loom_args), model_dir, args.dtype, args.threads, peers.free_port(), "model",
                loom_args, log_dir / "loom.log",
            ),
            llama_server.llama_peer(
                f"llama.cpp ({gguf_type})", server, gguf_file, peers.free_port(), opts, log_dir / "llama.log"
            ),
        ]  # fmt: skip

        def info(peer: peers.Peer) -> dict:
            if peer.kind == "llama.cpp":
                return {"gguf": str(gguf_file), "system_info": llama_server.system_info(peer.log)} | (
                    {"build": llama_server.build_summary(build)} if build else {}
                )
            return {"model": str(model_dir), "dtype": args.dtype}

        def decode(token_id: int) -> str:
            return tokenizer.decode([token_id], skip_special_tokens=False)

        command = shlex.join(["loom", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else ""
        result = compare.run_compare(
            servers, settings, cfg.vocab_size, cfg.max_position_embeddings, decode, command, info
        )
    except (BenchError, InvalidRequest, OSError, llama_server.LlamaServerError, gguf.GGUFError) as e:
        raise SystemExit(f"loom bench llama-server compare: {e}") from e
    print(format_compare(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


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
