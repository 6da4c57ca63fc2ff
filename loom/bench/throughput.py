"""Offline throughput: loom vs HF transformers (and llama.cpp, when installed) on one workload, with the
machine's roofline measured in the same run.

    loom bench throughput --dtypes float32,bfloat16 --json out.json --png out.png
    loom bench throughput --workload shared-prefix --systems loom,hf-static
    loom bench throughput --llama-cpp-src /tmp/lcp/llama_cpp_python-0.3.36.tar.gz   (see loom/bench/gguf.py)

Workloads are token ids, seeded: `random` (prompt 16-256, output 16-128 tokens), `sharegpt-like` (length
pairs from the committed table, prompts capped to the model's context), `shared-prefix` (4 groups of
requests sharing a 1,024-token prefix, then 16-64 tokens of their own). Every request is greedy with EOS
ignored, so every system produces exactly the same number of useful tokens. Systems (loom/bench/systems.py)
are loaded and warmed up on a few short requests, then take turns over `--repeats` timed rounds; each
keeps its fastest. The machine's ceilings (matmul FLOP/s, memory bandwidth) are re-measured after every
round, so the roofline columns compare against this machine as it is now. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import random
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from loom.bench import gguf
from loom.bench.roofline import Roofline, measure_roofline
from loom.bench.systems import SYSTEMS, Request, Run, Setup, llama_cpp_available
from loom.bench.throughput_report import Row, agreement, plot, roofline_fraction, roofline_report, table
from loom.bench.workloads import load_length_table
from loom.models.config import ModelConfig

FIRST_ORDINARY_ID = 3  # ids 0-2 are the tiny models' special tokens


class ForeignLoad:
    """CPU time other processes used on this machine while a block ran, in cores.

    The benchmark machines are shared: another process busy on one of two cores stalls every
    2-thread OpenMP op of ours at a barrier (a few ms each), so a run is only comparable with the
    load it ran under printed beside it."""

    def __init__(self, ours: Callable[[], float] = lambda: 0.0):
        self.ours = ours
        """CPU seconds so far of other processes that are part of the measurement (servers under test)."""

    def __enter__(self) -> ForeignLoad:
        self._start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        busy0, own0, t0 = self._start
        busy1, own1, t1 = self._sample()
        self.seconds = t1 - t0
        self.cores = max(0.0, ((busy1 - busy0) - (own1 - own0)) / self.seconds)

    def _sample(self) -> tuple[float, float, float]:
        total = psutil.cpu_times()
        own = psutil.Process().cpu_times()
        ours = own.user + own.system + self.ours()
        return total.user + total.system + total.nice, ours, time.perf_counter()


WORKLOADS = ("random", "sharegpt-like", "shared-prefix")


def make_workload(spec: str, num_requests: int, vocab_size: int, seed: int, max_len: int) -> list[Request]:
    """`num_requests` token-id requests of workload `spec` (one of WORKLOADS); none longer than max_len."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(n)]

    if spec == "random":
        lengths = ((rng.randint(16, 256), rng.randint(16, 128)) for _ in range(num_requests))
        return [Request(ids(p), o) for p, o in lengths]
    if spec == "sharegpt-like":
        pairs = [(p, min(o, max_len // 2)) for p, o in rng.choices(load_length_table(), k=num_requests)]
        return [Request(ids(min(p, max_len - o)), o) for p, o in pairs]
    if spec == "shared-prefix":
        prefixes = [ids(min(1024, max_len // 2)) for _ in range(4)]
        return [
            Request(prefixes[i % 4] + ids(rng.randint(16, 64)), rng.randint(16, 128))
            for i in range(num_requests)
        ]
    raise SystemExit(
        f"loom bench throughput: unknown workload {spec!r}; choose one of {', '.join(WORKLOADS)}"
    )


def warmup_workload(reqs: list[Request]) -> list[Request]:
    return [Request(r.prompt[:32], 8) for r in reqs[:4]]


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def run_dtype(
    systems: list[str],
    model_dir: Path,
    dtype: str,
    setup: Setup,
    reqs: list[Request],
    repeats: int,
    bar: tqdm,
) -> tuple[list[Row], Roofline, float]:
    """Load every system, warm each up once on a few short requests, then time the whole workload
    `repeats` rounds, the systems taking turns within a round and the machine's ceilings re-measured
    after each. Keeps each system's fastest run and the best ceilings: on a shared machine the fastest
    is the run least disturbed by other processes, and turns give every system the same chances.
    Returns the rows, the ceilings and the least other-process load seen while measuring them."""
    cfg = ModelConfig.from_dir(model_dir)
    rows = {name: Row(name, dtype) for name in systems}
    roof, roof_load = None, float("inf")
    with ExitStack() as stack:
        runs: dict[str, Run] = {}
        for name in systems:
            log(f"[{dtype}] loading and warming up {name}")
            try:
                runs[name] = stack.enter_context(SYSTEMS[name](model_dir, dtype, setup))
                runs[name](warmup_workload(reqs))
            except Exception as e:  # report, don't fake: a system that fails is a row with its error
                runs.pop(name, None)
                rows[name].note = f"failed: {type(e).__name__}: {e}"[:200]
        for i in range(repeats):
            for name, run in list(runs.items()):
                row = rows[name]
                try:
                    with ForeignLoad() as load:
                        t0 = time.perf_counter()
                        outputs, steps, note = run(reqs)
                        seconds = time.perf_counter() - t0
                except Exception as e:
                    del runs[name]
                    row.seconds = row.outputs = None
                    row.note = f"failed: {type(e).__name__}: {e}"[:200]
                    continue
                finally:
                    bar.update()
                log(f"[{dtype}] round {i + 1}: {name} {seconds:.1f} s (other load {load.cores:.2f} cores)")
                if row.seconds is None or seconds < row.seconds:
                    row.seconds, row.outputs, row.steps = seconds, outputs, steps
                    row.foreign_load, row.note = load.cores, note
            with ForeignLoad() as load:
                measured = measure_roofline(dtype, cfg, num_threads=setup.threads)
            roof = measured if roof is None else roof.best(measured)
            roof_load = min(roof_load, load.cores)
    for row in rows.values():
        if not row.ok:
            continue
        if row.steps:
            row.note = ", ".join(
                filter(None, [row.note, f"{row.steps} steps, {1e3 * row.seconds / row.steps:.1f} ms/step"])
            )
        bad = sum(len(o) != r.output_len for o, r in zip(row.outputs, reqs, strict=True))
        if bad:
            row.note += f"; {bad} requests had a wrong output length"
    return list(rows.values()), roof, roof_load


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", help="HF model directory (default: the built-in small llama, made if absent)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--workload", default="random", choices=WORKLOADS)
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--systems",
        help=f"comma-separated, from {', '.join(SYSTEMS)} (default: all but llama.cpp, which is added "
        "when llama-cpp-python is installed)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed rounds (systems take turns); each system's fastest is kept",
    )
    ap.add_argument(
        "--gguf",
        action="append",
        default=[],
        metavar="DTYPE=PATH",
        help="llama.cpp: the GGUF of --model in DTYPE (repeat per dtype)",
    )
    ap.add_argument(
        "--llama-cpp-src",
        metavar="PATH",
        help="llama.cpp: llama-cpp-python's source (sdist .tar.gz or directory); its convert_hf_to_gguf.py "
        "makes the GGUF of each dtype without --gguf (cached in ~/.cache/loom/gguf)",
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--png", help="also plot throughput per system here")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loom bench throughput", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def gguf_for(dtype: str, model_dir: Path, args: argparse.Namespace) -> tuple[Path | None, str]:
    """The llama.cpp GGUF for this dtype (given, or converted), or None and why not."""
    given = dict(g.split("=", 1) for g in args.gguf if "=" in g)
    if dtype in given:
        return Path(given[dtype]), ""
    if args.llama_cpp_src is None:
        return None, f"no GGUF for {dtype}: pass --gguf {dtype}=PATH or --llama-cpp-src"
    log(f"[{dtype}] converting {model_dir} to GGUF with {args.llama_cpp_src}")
    try:
        return gguf.convert(model_dir, dtype, Path(args.llama_cpp_src)), ""
    except gguf.GGUFError as e:
        return None, str(e)


def run(args: argparse.Namespace) -> int:
    dtypes = [d for d in args.dtypes.split(",") if d]
    if args.systems is None:
        systems = [s for s in SYSTEMS if s != "llama.cpp" or llama_cpp_available()]
    else:
        systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(
            f"loom bench throughput: unknown systems {sorted(unknown)}; choose from {list(SYSTEMS)}"
        )
    if bad := [g for g in args.gguf if "=" not in g]:
        raise SystemExit(f"loom bench throughput: --gguf takes DTYPE=PATH, got {bad}")
    if args.model is None:
        from loom.models.tiny import default_model_dir

        model_dir = default_model_dir("llama", "small")
    else:
        model_dir = Path(args.model)
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_dir(model_dir)
    reqs = make_workload(
        args.workload, args.num_requests, cfg.vocab_size, args.seed, cfg.max_position_embeddings
    )
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    output_tokens = sum(r.output_len for r in reqs)
    max_len = max(len(r.prompt) + r.output_len for r in reqs)
    # Enough KV for the whole workload at once (in 16-token blocks), so no system is limited by cache size.
    kv_tokens = sum(-(-(len(r.prompt) + r.output_len) // 16) * 16 for r in reqs)
    started = datetime.datetime.now().astimezone()
    print(
        f"# {started:%Y-%m-%d %H:%M %Z} | {platform.processor() or platform.machine()} | torch "
        f"{torch.__version__} | {args.threads} threads\n# model {model_dir} ({cfg.num_params / 1e6:.1f}M "
        f"params) | {args.workload}: {len(reqs)} requests, {prompt_tokens:,} prompt + {output_tokens:,} "
        "output tokens",
        flush=True,
    )

    rows: list[Row] = []
    roofs: dict[str, Roofline] = {}
    roof_loads: dict[str, float] = {}
    bar = tqdm(
        total=len(dtypes) * len(systems) * args.repeats, desc="bench throughput", unit="run", disable=None
    )
    for dtype in dtypes:
        setup = Setup(args.threads, kv_tokens, extra={"max_len": -(-max_len // 256) * 256})
        why = ""
        if "llama.cpp" in systems:
            setup.gguf, why = gguf_for(dtype, model_dir, args)
        dtype_rows, roofs[dtype], roof_loads[dtype] = run_dtype(
            systems, model_dir, dtype, setup, reqs, args.repeats, bar
        )
        for row in dtype_rows:
            row.prompt_tokens, row.useful_output_tokens = prompt_tokens, output_tokens
            if row.system == "llama.cpp" and why:
                row.note = why
        gc.collect()
        ref = next((r for r in dtype_rows if r.system == "hf-static" and r.ok), None)
        for r in dtype_rows:
            if ref is not None and r is not ref and r.ok:
                r.note += f"; {100 * agreement(r.outputs, ref.outputs):.0f}% tokens agree with hf-static"
        rows.extend(dtype_rows)
        loom_row = next((r for r in dtype_rows if r.system == "loom"), None)
        print(roofline_report(roofs[dtype], cfg, reqs, loom_row), flush=True)
        print(
            f"  (best of {args.repeats} measurements; other processes kept >= {roof_loads[dtype]:.2f} cores busy)"
        )
    bar.close()

    print()
    print(table(rows, roofs, cfg))
    if args.png:
        plot(rows, roofs, cfg, args.png, f"{model_dir.name}, {args.workload}, {args.threads} threads")
    if args.json:
        result = {
            "date": started.isoformat(),
            "args": {k: v for k, v in vars(args).items() if not callable(v)},
            "model": str(model_dir),
            "workload": args.workload,
            "num_params": cfg.num_params,
            "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
            "rooflines": {
                d: asdict(r) | {"peak_flops": r.peak_flops, "foreign_load": roof_loads[d]}
                for d, r in roofs.items()
            },
            "rows": [
                {k: v for k, v in asdict(r).items() if k != "outputs"}
                | (
                    {
                        "output_tok_s": r.output_tps(),
                        "total_tok_s": r.total_tps(),
                        "roofline_fraction": roofline_fraction(r, roofs[r.dtype], cfg),
                    }
                    if r.ok
                    else {}
                )
                for r in rows
            ],
        }
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
