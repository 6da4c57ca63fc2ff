"""Agent workflows end to end on loom's in-process engine: what the dataflow runtime, prefix caching and
program-aware scheduling buy together, in one run on one model.

1. Fan-out: examples/research_fanout.yaml (8 questions over one shared document, then a summary) with
   a deterministic ~1,536-token document. Baseline: the nodes one at a time in topological order, on
   an engine with prefix caching off. loom: the Runtime's parallel dataflow, prefix caching on.
   Reports wall time, the speedup, prompt tokens sent / served from cache / actually computed.
2. Mixed load: 4 long programs (chains of 6 calls over their own long document, 2x the tokens) and 12
   short ones (chains of 1-2 small calls) submitted together (the short ones a moment later) to an
   engine running at most 4 sequences; once with scheduling_policy=fcfs, once with program (least
   attained service per program). Reports mean completion time of short, long and all programs.

Every call decodes greedily with ignore_eos (the workflow's own sampling is replaced), so both sides of
each comparison generate the same number of tokens. Each engine is warmed up with one call first.

    python benchmarks/agent_dag.py [--model DIR] [--dtype bfloat16] [--threads 2] [--small]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import torch

from loom.agent import EngineClient, NodeRecord, RunRecord, Runtime, Workflow, load_workflow
from loom.agent.graph import REQUIRED
from loom.agent.nodes import NodeContext, run_node
from loom.agent.template import INPUT
from loom.agent.tools import ToolRegistry
from loom.config import EngineConfig
from loom.models.tiny import default_model_dir
from loom.tokenizer import Tokenizer

FANOUT_YAML = Path(__file__).resolve().parents[1] / "examples" / "research_fanout.yaml"
KV_BYTES = 2**30
# Plain words for documents: the model's weights are random, so only the token counts matter.
WORDS = (
    "the valley river stone summer water bridge field report survey measure rate cost model engine "
    "request cache block token latency budget queue policy program branch summary claim evidence "
    "method risk number result trial sample error signal noise growth decline region market price "
    "supply demand study team plan step review draft figure table source value change period"
).split()


@dataclass
class FanOutResult:
    seconds: float
    prompt_tokens: int
    """Prompt tokens of all calls, as sent."""
    cached_tokens: int
    """Of those, served from the prefix cache (run record)."""
    computed_tokens: int
    """Prompt tokens the engine actually ran through the model (engine stats)."""


@dataclass
class MixedResult:
    short: list[float]
    """Completion time of each short program, seconds from its own submission."""
    long: list[float]
    short_steps: list[int]
    """Completion time of each short program in engine steps: the same measure, blind to machine load."""
    long_steps: list[int]
    makespan: float


def make_document(tokenizer: Tokenizer, num_tokens: int, seed: int) -> str:
    """Deterministic prose of exactly (or, at a word boundary, just under) num_tokens tokens."""
    rng = random.Random(seed)
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < num_tokens:
        sentence = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        words.extend([sentence[0].capitalize(), *sentence[1:-1], sentence[-1] + "."])
    lo, hi = 1, len(words)  # the longest word prefix that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid]), add_special_tokens=False)) <= num_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def greedy(max_tokens: int) -> dict:
    return {"max_tokens": max(1, max_tokens), "temperature": 0.0, "ignore_eos": True}


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        num_threads=args.threads,
        kv_cache_memory_bytes=KV_BYTES,
        **overrides,
    )


async def warm_up(client: EngineClient) -> None:
    """One short call, so the first measured call pays no one-time costs (kernels, allocator)."""
    await client.chat([{"role": "user", "content": "Warm up."}], **greedy(4))


async def run_sequential(client: EngineClient, wf: Workflow, inputs: dict) -> RunRecord:
    """The baseline: each node awaited in turn, in topological order, through the runtime's own node code."""
    order = wf.validate()
    resolved = wf.resolve_inputs(inputs)
    record = RunRecord("sequential", f"{wf.name}-sequential", wf.name, time.time())
    outputs: dict = {}
    t0 = time.monotonic()
    for name in order:
        node = wf.nodes[name]
        rec = record.nodes[name] = NodeRecord(name, node.kind, list(node.deps))
        ctx = NodeContext(
            node=node,
            values={INPUT: resolved, **{dep: outputs[dep] for dep in node.deps}},
            client=client,
            tools=ToolRegistry(),
            program_id=record.program_id,
            sampling=wf.sampling,
            record=rec,
            emit=lambda kind, data: None,
        )
        rec.start = time.monotonic() - t0
        outputs[name] = await run_node(ctx)
        rec.end, rec.status = time.monotonic() - t0, "ok"
    record.status, record.duration = "ok", time.monotonic() - t0
    client.end_program(record.program_id)
    return record


async def fan_out(args: argparse.Namespace, document: str, parallel: bool) -> FanOutResult:
    wf = load_workflow(FANOUT_YAML)
    wf.sampling = greedy(args.max_tokens)
    inputs = {"document": document}
    async with EngineClient.launch(engine_config(args, enable_prefix_caching=parallel)) as client:
        await warm_up(client)
        stats = client.engine.core.stats
        before = stats.num_prompt_tokens_computed
        t = time.perf_counter()
        if parallel:
            result = await Runtime(client).run(wf, inputs)
            result.raise_for_errors()
            record = result.record
        else:
            record = await run_sequential(client, wf, inputs)
        seconds = time.perf_counter() - t
        totals = record.totals
        computed = stats.num_prompt_tokens_computed - before
    return FanOutResult(seconds, totals["prompt_tokens"], totals["cached_tokens"], computed)


def chain_workflow(name: str, calls: int, max_tokens: int) -> Workflow:
    """A chain of `calls` LLM calls over one document; each call reads the previous answer."""
    wf = Workflow(name, inputs={"document": REQUIRED}, sampling=greedy(max_tokens))
    system = "You are a careful analyst. Answer from the document below.\n\nDocument:\n{input.document}"
    for k in range(1, calls + 1):
        prompt = f"Step {k}: note one more fact from the document."
        if k > 1:
            prompt += f" Your previous note was: {{step{k - 1}}}"
        wf.llm(f"step{k}", prompt, system=system)
    return wf


async def mixed_load(args: argparse.Namespace, tokenizer: Tokenizer, policy: str) -> MixedResult:
    """All programs on one engine; the long ones submitted at once, the short ones a few steps later."""
    long_wf = chain_workflow("long", args.long_calls, 2 * args.max_tokens)
    short_wfs = [chain_workflow(f"short{c}", c, args.max_tokens // 2) for c in (1, 2)]
    long_docs = [
        make_document(tokenizer, args.context_tokens // 2, seed=100 + i) for i in range(args.long_programs)
    ]
    short_docs = [make_document(tokenizer, 64, seed=200 + i) for i in range(args.short_programs)]
    config = engine_config(args, max_num_seqs=args.max_num_seqs, scheduling_policy=policy)
    async with EngineClient.launch(config) as client:
        await warm_up(client)
        runtime = Runtime(client)
        stats = client.engine.core.stats

        async def program(wf: Workflow, document: str) -> tuple[float, int]:
            t, steps = time.perf_counter(), stats.num_steps
            result = await runtime.run(wf, {"document": document})
            result.raise_for_errors()
            return time.perf_counter() - t, stats.num_steps - steps

        async def steps_later(first_step: int) -> None:
            # "A moment later" counted in engine steps, not seconds, so the short programs meet the
            # same engine state on a fast machine and a slow one.
            while stats.num_steps < first_step + args.short_after_steps:
                await asyncio.sleep(0.002)

        async def short_program(wf: Workflow, document: str) -> tuple[float, int]:
            await gate
            return await program(wf, document)

        t0 = time.perf_counter()
        gate = asyncio.ensure_future(steps_later(stats.num_steps))
        longs = [program(long_wf, doc) for doc in long_docs]
        shorts = [short_program(short_wfs[i % 2], doc) for i, doc in enumerate(short_docs)]
        times = await asyncio.gather(*longs, *shorts)
        makespan = time.perf_counter() - t0
    seconds, steps = zip(*times, strict=True)
    n = args.long_programs
    return MixedResult(list(seconds[n:]), list(seconds[:n]), list(steps[n:]), list(steps[:n]), makespan)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the built-in ~88M llama)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context-tokens", type=int, default=1536, help="shared document of the fan-out")
    ap.add_argument(
        "--max-tokens", type=int, default=16, help="tokens per fan-out call (long calls 2x, short 1/2)"
    )
    ap.add_argument("--long-programs", type=int, default=4)
    ap.add_argument("--long-calls", type=int, default=6, help="calls per long program")
    ap.add_argument("--short-programs", type=int, default=12, help="half make 1 call, half 2")
    ap.add_argument("--max-num-seqs", type=int, default=4, help="engine limit in the mixed load")
    ap.add_argument(
        "--short-after-steps",
        type=int,
        default=1,
        help="engine steps the short programs arrive after the long",
    )
    ap.add_argument("--small", action="store_true", help="a quick run at toy sizes (smoke test)")
    args = ap.parse_args(argv)
    if args.small:
        args.context_tokens, args.max_tokens = min(args.context_tokens, 256), min(args.max_tokens, 4)
        args.long_programs, args.long_calls, args.short_programs = 2, 3, 4
        args.max_num_seqs = min(args.max_num_seqs, 2)  # as many slots as long programs, as at full size
    args.model = args.model or str(default_model_dir("llama", "small"))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer(args.model)
    document = make_document(tokenizer, args.context_tokens, seed=0)

    async def run_all() -> tuple[dict[bool, FanOutResult], dict[str, MixedResult]]:
        fan = {parallel: await fan_out(args, document, parallel) for parallel in (False, True)}
        mixed = {policy: await mixed_load(args, tokenizer, policy) for policy in ("fcfs", "program")}
        return fan, mixed

    fan, mixed = asyncio.run(run_all())
    report(args, fan, mixed)
    shown = sys.argv[1:] if argv is None else argv
    print("\ncommand: " + shlex.join(["python", "benchmarks/agent_dag.py", *shown]))


def report(args: argparse.Namespace, fan: dict[bool, FanOutResult], mixed: dict[str, MixedResult]) -> None:
    seq, par = fan[False], fan[True]
    fcfs, prog = mixed["fcfs"], mixed["program"]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    print(
        f"\nmodel {args.model}, {args.dtype}, {args.threads} threads\n"
        f"fan-out: {args.context_tokens}-token document, {args.max_tokens} tokens per call\n"
        f"mixed load: {args.long_programs} long programs x {args.long_calls} calls "
        f"({args.context_tokens // 2}-token documents, {2 * args.max_tokens} tokens per call), "
        f"{args.short_programs} short x 1-2 calls (64-token documents, {max(1, args.max_tokens // 2)} "
        f"tokens per call), max_num_seqs {args.max_num_seqs}\n"
    )
    print("| fan-out (research_fanout.yaml) | sequential, caching off | Runtime, caching on | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| wall seconds | {seq.seconds:.3f} | {par.seconds:.3f} | {ratio(seq.seconds, par.seconds)} |")
    print(f"| prompt tokens sent | {seq.prompt_tokens} | {par.prompt_tokens} | |")
    print(f"| prompt tokens from cache | {seq.cached_tokens} | {par.cached_tokens} | |")
    computed = ratio(seq.computed_tokens, par.computed_tokens)
    print(f"| prompt tokens computed | {seq.computed_tokens} | {par.computed_tokens} | {computed} |")

    print("\n| mixed load, mean per program | fcfs | program | fcfs / program |")
    print("|---|---:|---:|---:|")
    rows = [
        ("short programs, seconds", mean(fcfs.short), mean(prog.short)),
        ("long programs, seconds", mean(fcfs.long), mean(prog.long)),
        ("all programs, seconds", mean(fcfs.short + fcfs.long), mean(prog.short + prog.long)),
        ("short programs, engine steps", mean(fcfs.short_steps), mean(prog.short_steps)),
        ("long programs, engine steps", mean(fcfs.long_steps), mean(prog.long_steps)),
        ("makespan, seconds", fcfs.makespan, prog.makespan),
    ]
    for name, a, b in rows:
        digits = 1 if "steps" in name else 3
        print(f"| {name} | {a:.{digits}f} | {b:.{digits}f} | {ratio(a, b)} |")


if __name__ == "__main__":
    main()
