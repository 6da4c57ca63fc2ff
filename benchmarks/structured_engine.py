"""Structured output through the real engine: per-step time of a batch of 32 decoding sequences with 0%,
50% and 100% of them under a JSON schema, and grammar compile time per schema (cold and cached).

    python benchmarks/structured_engine.py [--size tiny|small] [--steps 24] [--repeats 3]

The schema keeps every sequence inside an array it may not close for hundreds of tokens (minItems), so all
32 rows are under the grammar for every timed step. The three mixes are interleaved (A B C A B C ...) and
the median taken, so load on a shared machine hits them alike. The mask work (fill + apply) is also timed
inside the steps: mask overhead = mask ms per step / the step with no grammar row (which builds no mask
at all); the step-time difference is reported too, but on a loaded machine it is mostly noise. Writes
benchmarks/results/structured_engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from structured import SCHEMAS  # noqa: E402 - the phase-1 benchmark's schemas

from loom import LLM, SamplingParams  # noqa: E402
from loom.engine.structured import GrammarSpec  # noqa: E402
from loom.engine.structured.engine import StepBitmask  # noqa: E402
from loom.models.tiny import make_tiny  # noqa: E402
from loom.paths import cache_dir

BATCH = 32
LONG = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "value": {"type": "integer", "minimum": 0, "maximum": 1000},
        },
        "required": ["name", "value"],
        "additionalProperties": False,
    },
    "minItems": 500,
}


class MaskTimer:
    """Times the mask work of each step (filling: bitmask_for; applying: StepBitmask.apply), measured
    inside the same steps, so the overhead is not lost in the step times' noise on a loaded machine."""

    def __init__(self, llm: LLM):
        self.seconds = 0.0
        manager, fill = llm.engine.structured, llm.engine.structured.bitmask_for

        def timed_fill(sched, requests):
            start = time.perf_counter()
            try:
                return fill(sched, requests)
            finally:
                self.seconds += time.perf_counter() - start

        manager.bitmask_for = timed_fill
        apply = StepBitmask.apply

        def timed_apply(step, logits, placements):
            start = time.perf_counter()
            try:
                apply(step, logits, placements)
            finally:
                self.seconds += time.perf_counter() - start

        StepBitmask.apply = timed_apply


def step_ms(llm: LLM, grammar_rows: int, steps: int, timer: MaskTimer | None = None) -> tuple[float, float]:
    """(median ms of `steps` decode steps of a batch of BATCH with grammar_rows of them under LONG, mean
    mask ms per step)."""
    engine = llm.engine
    prompt = llm.input.encode("Write the data as JSON, then stop.")
    tag = f"{grammar_rows}-{time.monotonic_ns()}"
    for i in range(BATCH):
        structured = {"json": LONG} if i < grammar_rows else None
        params = SamplingParams(
            max_tokens=steps + 8, temperature=0, ignore_eos=True, structured_outputs=structured
        )
        job = llm.input.process(f"{tag}-{i}", prompt, params)
        engine.add_request(job.seqs[0])
    engine.step()  # the prefill of all 32
    engine.step()
    times = []
    mask_before = timer.seconds if timer else 0.0
    for _ in range(steps):
        start = time.perf_counter()
        outputs = engine.step()
        times.append(time.perf_counter() - start)
        assert len(outputs) == BATCH and not any(o.finished for o in outputs), "a sequence ended early"
    mask_ms = ((timer.seconds if timer else 0.0) - mask_before) / steps * 1000
    engine.abort_requests([f"{tag}-{i}" for i in range(BATCH)])
    while engine.has_unfinished():
        engine.step()
    return statistics.median(times) * 1000, mask_ms


def compile_ms(llm: LLM) -> dict:
    compiler = llm.input.grammars.compiler()  # made here, outside the timings
    out = {}
    for name, schema in {**SCHEMAS, "long_array": LONG}.items():
        spec = GrammarSpec.json_schema(schema, param="bench")
        start = time.perf_counter()
        compiler.compile(spec)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        compiled = compiler.compile(spec)
        compiled.matcher()  # what admission costs on a hit: a lookup and a matcher copy
        cached = time.perf_counter() - start
        out[name] = {"cold_ms": round(cold * 1000, 3), "cached_ms": round(cached * 1000, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the shared-machine setting)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "structured_engine.json"
    )
    args = parser.parse_args()
    model = make_tiny(cache_dir(f"bench-{args.size}"), size=args.size)
    llm = LLM(str(model), num_blocks=2048, max_num_seqs=64, num_threads=args.threads, dtype="float32")
    load_before = os.getloadavg()
    compile_times = compile_ms(llm)  # first: the warm-up below compiles LONG
    step_ms(llm, BATCH, 4)  # warm-up: compiles LONG, allocates the bitmask, warms the kernels
    timer = MaskTimer(llm)
    runs: dict[int, list[tuple[float, float]]] = {0: [], BATCH // 2: [], BATCH: []}
    for _ in range(args.repeats):
        for rows in runs:
            runs[rows].append(step_ms(llm, rows, args.steps, timer))
    base = statistics.median(ms for ms, _ in runs[0])
    steps = {}
    for rows, samples in runs.items():
        ms = statistics.median(s for s, _ in samples)
        mask = statistics.median(m for _, m in samples)
        steps[f"{rows}_of_{BATCH}"] = {
            "step_ms": round(ms, 2),
            "samples_ms": [round(s, 2) for s, _ in samples],
            "mask_ms": round(mask, 3),
            "mask_pct_of_plain_step": round(100 * mask / base, 1),
            "step_overhead_pct": round(100 * (ms - base) / base, 1),
        }
    result = {
        "model": args.size,
        "vocab": llm.engine.vocab_size,
        "threads": args.threads,
        "batch": BATCH,
        "steps_per_sample": args.steps,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "decode_step": steps,
        "compile": compile_times,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
