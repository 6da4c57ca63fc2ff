"""Offline throughput: loom vs HF transformers (static batches, and continuous batching) on one workload.

    loom bench throughput --dtypes float32,bfloat16 --json out.json   (or python benchmarks/throughput.py)

The workload is `--num-requests` requests of random token ids (prompt 16-256 tokens, output 16-128 tokens,
seeded), all greedy with EOS ignored, so every system produces exactly the same number of useful tokens.
Each system is warmed up on a few short requests first, then timed once over the whole workload. The
machine's ceilings (matmul FLOP/s, memory bandwidth) are measured in the same process just before each
dtype's runs, so the roofline columns compare against this machine as it is now. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from loom.bench.roofline import Roofline, flops_per_token, measure_roofline, weight_bytes
from loom.models.config import ModelConfig

FIRST_ORDINARY_ID = 3  # ids 0-2 are the tiny models' special tokens
HF_STATIC_BATCH = 16
HF_PAD_ID = 0
# loom's EngineConfig defaults, given to HF continuous batching too.
LOOM_TOKEN_BUDGET = 2048
LOOM_MAX_SEQS = 128


@dataclass
class Request:
    prompt: list[int]
    output_len: int


@dataclass
class Row:
    system: str
    dtype: str
    seconds: float | None = None
    prompt_tokens: int = 0
    useful_output_tokens: int = 0
    note: str = ""
    outputs: list[list[int]] | None = field(default=None, repr=False)
    foreign_load: float | None = None
    """Cores other processes kept busy during the timed run (see ForeignLoad)."""
    steps: int | None = None
    """Forward passes (loom and HF static; HF static counts one per generated position per batch)."""

    @property
    def ok(self) -> bool:
        return self.seconds is not None

    def output_tps(self) -> float:
        return self.useful_output_tokens / self.seconds

    def total_tps(self) -> float:
        return (self.prompt_tokens + self.useful_output_tokens) / self.seconds


class ForeignLoad:
    """CPU time other processes used on this machine while a block ran, in cores.

    The benchmark machines are shared: another process busy on one of two cores stalls every
    2-thread OpenMP op of ours at a barrier (a few ms each), so a run is only comparable with the
    load it ran under printed beside it."""

    def __enter__(self) -> ForeignLoad:
        self._start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        busy0, own0, t0 = self._start
        busy1, own1, t1 = self._sample()
        self.cores = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        total = psutil.cpu_times()
        own = psutil.Process().cpu_times()
        return total.user + total.system + total.nice, own.user + own.system, time.perf_counter()


def make_workload(num_requests: int, vocab_size: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(num_requests):
        plen, olen = rng.randint(16, 256), rng.randint(16, 128)
        reqs.append(Request([rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(plen)], olen))
    return reqs


def warmup_workload(reqs: list[Request]) -> list[Request]:
    return [Request(r.prompt[:32], 8) for r in reqs[:4]]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- systems -------------------------------------------------------------------------------------
# Each system is a context manager that loads the model and yields run(requests) -> (outputs, steps, note),
# so the timing loop in main() is the same for all of them and none can time something the others don't.

Run = Callable[[list[Request]], tuple[list[list[int]], int | None, str]]


@contextmanager
def loom_system(model_dir: Path, dtype: str, threads: int, kv_tokens: int) -> Iterator[Run]:
    from loom import LLM, SamplingParams

    # No prefix caching: the timed rounds repeat the same prompts, and hits on the previous round's
    # blocks would skip most of the prefill (random prompts share nothing within one round).
    llm = LLM(
        model=str(model_dir),
        dtype=dtype,
        num_threads=threads,
        num_blocks=kv_tokens // 16,
        enable_prefix_caching=False,
    )

    def run(reqs: list[Request]) -> tuple[list[list[int]], int, str]:
        params = [SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True) for r in reqs]
        steps0 = llm.engine.stats.num_steps
        outs = llm.generate([r.prompt for r in reqs], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], llm.engine.stats.num_steps - steps0, ""

    yield run


def load_hf(model_dir: Path, dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()


@contextmanager
def hf_static_system(model_dir: Path, dtype: str, threads: int, kv_tokens: int) -> Iterator[Run]:
    from transformers import GenerationConfig

    model = load_hf(model_dir, dtype)

    def generate(batch: list[Request]) -> tuple[list[list[int]], int]:
        width = max(len(r.prompt) for r in batch)
        max_new = max(r.output_len for r in batch)
        ids = torch.full((len(batch), width), HF_PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every prompt ends at the same column
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
        # eos_token_id=None: generate exactly max_new tokens (the same effect as loom's ignore_eos).
        config = GenerationConfig(
            max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=HF_PAD_ID
        )
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        # Useful tokens only: each request's own output length; the rest of the batch's run is waste.
        return [out[i, width : width + r.output_len].tolist() for i, r in enumerate(batch)], max_new

    def run(reqs: list[Request]) -> tuple[list[list[int]], int, str]:
        outputs, steps = [], 0
        with torch.inference_mode():
            for b in range(0, len(reqs), HF_STATIC_BATCH):
                outs, n = generate(reqs[b : b + HF_STATIC_BATCH])
                outputs.extend(outs)
                steps += n
        return outputs, steps, f"batches of {HF_STATIC_BATCH}"

    yield run


@contextmanager
def hf_cb_system(model_dir: Path, dtype: str, threads: int, kv_tokens: int) -> Iterator[Run]:
    """HF continuous batching, through the manager that `generate_batch` wraps.

    `generate_batch` takes one max_new_tokens for every request; the manager's add_request takes one
    per request, so each request stops at its own length as in the other systems. Its KV capacity and
    token budget are set to loom's, since on CPU it would otherwise size its cache to 60% of RAM."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = load_hf(model_dir, dtype)
    page_size = 256
    cb_config = ContinuousBatchingConfig(
        page_size=page_size,
        num_blocks=max(1, -(-kv_tokens // page_size)),
        max_batch_tokens=LOOM_TOKEN_BUDGET,
        max_requests_per_batch=LOOM_MAX_SEQS,
        allow_block_sharing=False,  # no prefix caching, as for loom
    )
    # eos_token_id=-1: no token stops a request, as with loom's ignore_eos.
    gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=HF_PAD_ID)
    next_id = itertools.count()

    with (
        torch.inference_mode(),
        model.continuous_batching_context_manager(
            generation_config=gen_config, continuous_batching_config=cb_config
        ) as manager,
    ):
        attn = model.config._attn_implementation

        def run(reqs: list[Request]) -> tuple[list[list[int]], None, str]:
            ids = [
                manager.add_request(
                    r.prompt, request_id=f"r{next(next_id)}", max_new_tokens=r.output_len, eos_token_id=-1
                )
                for r in reqs
            ]
            results: dict[str, list[int]] = {}
            while len(results) < len(ids):
                res = manager.get_result(timeout=1)
                if res is None:
                    if not manager.is_running():
                        raise RuntimeError("the generation thread stopped")
                    continue
                if res.is_finished():
                    if res.error is not None:
                        raise RuntimeError(res.error)
                    results[res.request_id] = list(res.generated_tokens)
            return [results[i] for i in ids], None, f"attn {attn}, page {page_size}"

        yield run


SYSTEMS = {"loom": loom_system, "hf-static": hf_static_system, "hf-cb": hf_cb_system}


def run_dtype(
    systems: list[str], model_dir: Path, dtype: str, threads: int, reqs: list[Request], repeats: int
) -> tuple[list[Row], Roofline, float]:
    """Load every system, warm each up once on a few short requests, then time the whole workload
    `repeats` rounds, the systems taking turns within a round and the machine's ceilings re-measured
    after each. Keeps each system's fastest run and the best ceilings: on a shared machine the fastest
    is the run least disturbed by other processes, and turns give every system the same chances.
    Returns the rows, the ceilings and the least other-process load seen while measuring them."""
    cfg = ModelConfig.from_dir(model_dir)
    rows = {name: Row(name, dtype) for name in systems}
    # Enough KV for the whole workload at once (in 16-token blocks), so no system is limited by cache size.
    kv_tokens = sum(-(-(len(r.prompt) + r.output_len) // 16) * 16 for r in reqs)
    roof, roof_load = None, float("inf")
    with ExitStack() as stack:
        runs: dict[str, Run] = {}
        for name in systems:
            log(f"[{dtype}] loading and warming up {name}")
            try:
                runs[name] = stack.enter_context(SYSTEMS[name](model_dir, dtype, threads, kv_tokens))
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
                log(f"[{dtype}] round {i + 1}: {name} {seconds:.1f} s (other load {load.cores:.2f} cores)")
                if row.seconds is None or seconds < row.seconds:
                    row.seconds, row.outputs, row.steps = seconds, outputs, steps
                    row.foreign_load, row.note = load.cores, note
            with ForeignLoad() as load:
                measured = measure_roofline(dtype, cfg, num_threads=threads)
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


# ---- reporting -----------------------------------------------------------------------------------


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean over requests of the fraction of output tokens before the first difference."""
    fracs = []
    for x, y in zip(a, b, strict=True):
        n = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
        fracs.append(n / max(len(x), 1))
    return sum(fracs) / len(fracs)


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def table(rows: list[Row], roofs: dict[str, Roofline], cfg: ModelConfig) -> str:
    head = (
        "| system | dtype | time (s) | useful out tok/s | total tok/s | vs hf-static "
        "| % of compute roofline | other load (cores) | notes |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if not r.ok:
            lines.append(f"| {r.system} | {r.dtype} | - | - | - | - | - | - | {r.note} |")
            continue
        static = next((s for s in rows if s.system == "hf-static" and s.dtype == r.dtype and s.ok), None)
        vs = f"{r.output_tps() / static.output_tps():.2f}x" if static else "-"
        best = flops_per_token(cfg) * (r.prompt_tokens + r.useful_output_tokens) / roofs[r.dtype].peak_flops
        lines.append(
            f"| {r.system} | {r.dtype} | {r.seconds:.1f} | {fmt_rate(r.output_tps())} | "
            f"{fmt_rate(r.total_tps())} | {vs} | {100 * best / r.seconds:.1f}% | {r.foreign_load:.2f} | {r.note} |"
        )
    return "\n".join(lines)


def roofline_report(roof: Roofline, cfg: ModelConfig, reqs: list[Request], loom: Row | None) -> str:
    tokens = sum(len(r.prompt) + r.output_len for r in reqs)
    peak = roof.peak_flops
    best = flops_per_token(cfg) * tokens / peak
    shapes = ", ".join(f"M={m}: {f / 1e9:.0f}" for m, f in roof.model_flops.items())
    wbytes = weight_bytes(cfg, roof.dtype)
    step_floor = wbytes / roof.memory_bandwidth
    lines = [
        f"[{roof.dtype}, {roof.num_threads} threads] matmul GFLOP/s: {roof.square_size}^3 square "
        f"{roof.square_flops / 1e9:.0f}; model shapes {shapes}; peak {peak / 1e9:.0f}",
        f"  compute roofline: {flops_per_token(cfg) / 1e6:.0f} MFLOP/token -> {peak / flops_per_token(cfg):,.0f} "
        f"tok/s; the workload's {tokens:,} prompt+output tokens need >= {best:.2f} s",
        f"  memory bandwidth {roof.memory_bandwidth / 1e9:.1f} GB/s (copy, read+write); decode reads "
        f"{wbytes / 1e6:.0f} MB of weights per step -> >= {1e3 * step_floor:.2f} ms/step, "
        f"<= {1 / step_floor:,.0f} steps/s",
    ]
    if loom is not None and loom.ok:
        ms = 1e3 * loom.seconds / loom.steps
        lines.append(
            f"  loom: {loom.seconds:.2f} s = {100 * best / loom.seconds:.1f}% of compute roofline; "
            f"{loom.steps} steps at {ms:.1f} ms/step = {100 * step_floor * 1e3 / ms:.1f}% of the bandwidth floor"
        )
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", help="HF model directory (default: the built-in small llama, made if absent)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed rounds (systems take turns); each system's fastest is kept",
    )
    ap.add_argument("--json", help="also write the results here")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loom bench throughput", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    dtypes = [d for d in args.dtypes.split(",") if d]
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"loom bench throughput: unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    if args.model is None:
        from loom.models.tiny import default_model_dir

        model_dir = default_model_dir("llama", "small")
    else:
        model_dir = Path(args.model)
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_dir(model_dir)
    reqs = make_workload(args.num_requests, cfg.vocab_size, args.seed)
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    output_tokens = sum(r.output_len for r in reqs)
    started = datetime.datetime.now().astimezone()
    print(
        f"# {started:%Y-%m-%d %H:%M %Z} | {platform.processor() or platform.machine()} | torch "
        f"{torch.__version__} | {args.threads} threads\n# model {model_dir} ({cfg.num_params / 1e6:.1f}M "
        f"params) | {len(reqs)} requests, {prompt_tokens:,} prompt + {output_tokens:,} output tokens",
        flush=True,
    )

    rows: list[Row] = []
    roofs: dict[str, Roofline] = {}
    roof_loads: dict[str, float] = {}
    for dtype in dtypes:
        dtype_rows, roofs[dtype], roof_loads[dtype] = run_dtype(
            systems, model_dir, dtype, args.threads, reqs, args.repeats
        )
        for row in dtype_rows:
            row.prompt_tokens, row.useful_output_tokens = prompt_tokens, output_tokens
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

    print()
    print(table(rows, roofs, cfg))
    if args.json:
        result = {
            "date": started.isoformat(),
            "args": vars(args),
            "model": str(model_dir),
            "num_params": cfg.num_params,
            "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
            "rooflines": {
                d: asdict(r) | {"peak_flops": r.peak_flops, "foreign_load": roof_loads[d]}
                for d, r in roofs.items()
            },
            "rows": [
                {k: v for k, v in asdict(r).items() if k != "outputs"}
                | ({"output_tok_s": r.output_tps(), "total_tok_s": r.total_tps()} if r.ok else {})
                for r in rows
            ],
        }
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
