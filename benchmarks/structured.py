"""Structured-output benchmark: grammar compile time (cold, cached), per-step mask time (one sequence, a
batch of 32) at the tiny tokenizer's 2,048 vocabulary and a trained ~151k one, llguidance against xgrammar
when xgrammar is importable, and the mask overhead per decode step of the tiny and small models at 0%, 50%
and 100% of a batch of 32 under a JSON schema. One run, figures printed as markdown (and --json).

    nice -n 10 python benchmarks/structured.py [--json out.json] [--skip-models] [--steps 48]

xgrammar is not a loom dependency (its wheel pulls torch, transformers, triton and tvm-ffi); to compare,
install it in a scratch environment that can import loom (see loom/engine/structured/README.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import structured_tokenizer  # noqa: E402

from loom.engine.structured import (  # noqa: E402
    GrammarCompiler,
    GrammarSpec,
    MaskFiller,
    allocate_bitmask,
    apply_bitmask,
)
from loom.tokenizer import Tokenizer  # noqa: E402

logger = logging.getLogger("bench.structured")

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
PLAN = {  # what pydantic (LangChain's with_structured_output) emits
    "$defs": {
        "Step": {
            "properties": {
                "tool": {"enum": ["search", "calculator", "finish"], "type": "string"},
                "input": {"type": "string", "maxLength": 40},
            },
            "required": ["tool", "input"],
            "type": "object",
            "additionalProperties": False,
        }
    },
    "properties": {
        "goal": {"type": "string", "maxLength": 60},
        "steps": {"items": {"$ref": "#/$defs/Step"}, "type": "array", "minItems": 1, "maxItems": 4},
    },
    "required": ["goal", "steps"],
    "type": "object",
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "email": {"type": "string", "format": "email"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[a-z0-9]{8}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    "price": {"type": "number", "minimum": 0},
                },
                "required": ["sku", "qty", "price"],
                "additionalProperties": False,
            },
            "maxItems": 3,
        },
        "status": {"anyOf": [{"enum": ["open", "paid", "shipped"]}, {"type": "null"}]},
    },
    "required": ["id", "email", "items", "status"],
    "additionalProperties": False,
}
FORM = {  # a wide form: 40 fields of mixed kinds
    "type": "object",
    "properties": {
        f"field_{i}": [
            {"type": "string", "maxLength": 20},
            {"type": "integer", "minimum": 0, "maximum": 10_000},
            {"type": "boolean"},
            {"enum": ["a", "b", "c", "d"]},
            {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        ][i % 5]
        for i in range(40)
    },
    "required": [f"field_{i}" for i in range(40)],
    "additionalProperties": False,
}
SCHEMAS = {"weather": WEATHER, "plan": PLAN, "order": ORDER, "form40": FORM}


def _load() -> float:
    return os.getloadavg()[0]


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _walk_tokens(compiled, vocab_size: int, seed: int, cap: int) -> list[int]:
    """A grammar-valid token sequence (random logits, closing tokens favoured past 48) for replaying."""
    gen = torch.Generator().manual_seed(seed)
    matcher = compiled.matcher()
    bitmask = allocate_bitmask(1, vocab_size)
    tokens: list[int] = []
    while not matcher.is_terminated and len(tokens) < cap:
        matcher.fill_bitmask(bitmask, 0)
        logits = torch.randn(1, vocab_size, generator=gen)
        apply_bitmask(logits, bitmask)
        token = int(torch.multinomial(logits.softmax(-1)[0], 1, generator=gen))
        matcher.accept_token(token)
        tokens.append(token)
    return tokens


# ---- llguidance (loom's layer) -------------------------------------------------------------------------


def bench_llguidance(tokenizer: Tokenizer, steps: int, mask_threads: int) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    compiler = GrammarCompiler(tokenizer)
    out: dict = {"tokenizer_setup_ms": _ms(time.perf_counter() - t0), "compile": {}, "walks": {}}
    compiled = {}
    for name, schema in SCHEMAS.items():
        spec = GrammarSpec.json_schema(schema, param="bench")
        t0 = time.perf_counter()
        compiled[name] = compiler.compile(spec)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiler.compile(spec).matcher()
        cached = time.perf_counter() - t0
        out["compile"][name] = {"cold_ms": _ms(cold), "cached_ms": _ms(cached)}
    vocab = compiler.vocab_size
    walks = {name: [_walk_tokens(g, vocab, seed, steps) for seed in range(8)] for name, g in compiled.items()}
    out["walks"] = {name: statistics.mean(len(w) for w in ws) for name, ws in walks.items()}
    out["single_ms"] = _single(lambda name: compiled[name].matcher(), walks, vocab)
    out["batch32"] = _batch(lambda name: compiled[name].matcher(), walks, vocab, MaskFiller(mask_threads))
    compiler.close()
    return out, walks


def _single(new_matcher, walks: dict, vocab: int) -> dict:
    """Mean fill time per step of one sequence, replaying each schema's walks."""
    bitmask = allocate_bitmask(1, vocab)
    result = {}
    for name, ws in walks.items():
        times = []
        for tokens in ws:
            matcher = new_matcher(name)
            for token in tokens:
                t0 = time.perf_counter()
                matcher.fill_bitmask(bitmask, 0)
                times.append(time.perf_counter() - t0)
                matcher.accept_token(token)
        result[name] = _ms(statistics.mean(times))
    return result


def _batch(new_matcher, walks: dict, vocab: int, filler) -> dict:
    """32 sequences (8 walks of each schema) stepped in lockstep: fill time and apply time per step."""
    seqs = [(new_matcher(name), tokens) for name, ws in walks.items() for tokens in ws]
    bitmask = allocate_bitmask(len(seqs), vocab)
    logits = torch.randn(len(seqs), vocab)
    fill, apply = [], []
    for step in range(max(len(t) for _, t in seqs)):
        live = [(m, row) for row, (m, t) in enumerate(seqs) if step < len(t)]
        t0 = time.perf_counter()
        filler.fill(live, bitmask)
        t1 = time.perf_counter()
        apply_bitmask(logits.clone(), bitmask, [row for _, row in live])
        t2 = time.perf_counter()
        if len(live) == len(seqs):  # only full-batch steps count
            fill.append(t1 - t0)
            apply.append(t2 - t1)
        for m, row in live:
            m.accept_token(seqs[row][1][step])
    return {
        "fill_ms": _ms(statistics.mean(fill)),
        "apply_ms": _ms(statistics.mean(apply)),
        "steps": len(fill),
    }


# ---- xgrammar (optional) -------------------------------------------------------------------------------


def bench_xgrammar(tokenizer: Tokenizer, walks: dict, vocab: int) -> dict | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(
        tokenizer.hf, vocab_size=vocab, stop_token_ids=sorted(tokenizer.eos_token_ids)
    )
    xcompiler = xgr.GrammarCompiler(info, max_threads=2)
    out: dict = {"tokenizer_setup_ms": _ms(time.perf_counter() - t0), "compile": {}}
    compiled = {}
    for name, schema in SCHEMAS.items():
        text = json.dumps(schema)
        t0 = time.perf_counter()
        compiled[name] = xcompiler.compile_json_schema(text, any_whitespace=False, separators=(", ", ": "))
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        xgr.GrammarMatcher(xcompiler.compile_json_schema(text, any_whitespace=False, separators=(", ", ": ")))
        out["compile"][name] = {"cold_ms": _ms(cold), "cached_ms": _ms(time.perf_counter() - t0)}

    class _M:  # the replay loop's interface over an xgrammar matcher
        def __init__(self, name):
            self.m = xgr.GrammarMatcher(compiled[name])

        def fill_bitmask(self, bitmask, row):
            self.m.fill_next_token_bitmask(bitmask, row)

        def accept_token(self, token):
            return self.m.accept_token(token)

    class _Filler:
        def __init__(self):
            self.batch = xgr.BatchGrammarMatcher(max_threads=2)

        def fill(self, rows, bitmask):
            self.batch.batch_fill_next_token_bitmask([m.m for m, _ in rows], bitmask, [r for _, r in rows])

    # Replays llguidance's walks: both libraries take the same token sequences (same tokenizer, and
    # valid under both; a token xgrammar refuses is reported).
    refused = 0
    for name, ws in walks.items():
        for tokens in ws:
            m = _M(name)
            refused += sum(not m.accept_token(t) for t in tokens)
    out["refused_tokens"] = refused
    out["single_ms"] = _single(_M, walks, vocab)
    out["batch32"] = _batch(_M, walks, vocab, _Filler())
    return out


# ---- mask overhead against the model's step -------------------------------------------------------------


def model_step_ms(model: str, batch: int = 32, steps: int = 16) -> float:
    """Mean decode step of `batch` sequences on the built-in model (random weights, float32)."""
    from loom.config import EngineConfig
    from loom.engine.core import EngineCore
    from loom.models.tiny import default_model_dir
    from loom.sampling_params import SamplingParams

    core = EngineCore(EngineConfig(model=str(default_model_dir("llama", model)), num_threads=2))
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        core.add_request(f"r{i}", [3 + (i * 7 + j) % 500 for j in range(64)], params)
    for _ in range(4):  # prefill (chunked) and the first decode steps
        core.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def lm_head_ms(vocab: int, hidden: int = 768, batch: int = 32) -> float:
    """One [batch, hidden] x [hidden, vocab] float32 matmul: what a 151k-vocab head adds to a step."""
    w = torch.randn(vocab, hidden)
    x = torch.randn(batch, hidden)
    for _ in range(2):
        x @ w.T
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        x @ w.T
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def mask_overhead(tokenizer: Tokenizer, walks: dict, mask_threads: int) -> dict:
    """Mask work per step (fill + apply) with 0, 16 and 32 of 32 rows under a grammar."""
    compiler = GrammarCompiler(tokenizer)
    vocab = compiler.vocab_size
    grammars = {
        name: compiler.compile(GrammarSpec.json_schema(s, param="bench")) for name, s in SCHEMAS.items()
    }
    filler = MaskFiller(mask_threads)
    out = {}
    for rows in (0, 16, 32):
        seqs = [(grammars[name].matcher(), tokens) for name, ws in walks.items() for tokens in ws][:rows]
        bitmask = allocate_bitmask(32, vocab)
        logits = torch.randn(32, vocab)
        times = []
        for step in range(min((len(t) for _, t in seqs), default=32)):
            t0 = time.perf_counter()
            live = [(m, row) for row, (m, _) in enumerate(seqs)]
            if live:  # the engine's no-grammar path: nothing at all
                filler.fill(live, bitmask)
                apply_bitmask(logits, bitmask, [row for _, row in live])
            times.append(time.perf_counter() - t0)
            for m, t in seqs:
                m.accept_token(t[step])
        out[f"{rows}_of_32_ms"] = _ms(statistics.mean(times))
    compiler.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--steps", type=int, default=64, help="longest replayed walk (tokens)")
    parser.add_argument("--mask-threads", type=int, default=2, help="llguidance's batch-fill threads")
    parser.add_argument("--skip-models", action="store_true", help="no model step timings")
    parser.add_argument("--vocabs", default="2048,151k", help="which tokenizers: 2048 (tiny), 151k (trained)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    from loom.models.tiny import default_model_dir

    makers = {
        "2048": lambda: Tokenizer(default_model_dir("llama", "tiny")),
        "151k": lambda: Tokenizer(structured_tokenizer.build()),
    }
    tokenizers = {label: makers[label]() for label in args.vocabs.split(",")}
    report: dict = {"load_before": _load()}
    for label, tokenizer in tokenizers.items():
        logger.info("vocab %s (%d tokens), load %.1f", label, tokenizer.vocab_size, _load())
        llg, walks = bench_llguidance(tokenizer, args.steps, args.mask_threads)
        report[f"llguidance_{label}"] = llg
        report[f"xgrammar_{label}"] = bench_xgrammar(tokenizer, walks, tokenizer.vocab_size)
        report[f"overhead_{label}"] = mask_overhead(tokenizer, walks, args.mask_threads)
        report[f"load_after_{label}"] = _load()
    if not args.skip_models:
        for size in ("tiny", "small"):
            report[f"step_{size}_ms"] = round(model_step_ms(size), 3)
        report["lm_head_151k_ms"] = round(lm_head_ms(151_000), 3)
        report["lm_head_2048_ms"] = round(lm_head_ms(2048), 3)
    report["load_end"] = _load()
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
