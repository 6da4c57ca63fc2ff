"""Speculative decoding without a draft model (prompt lookup `ngram`, and `suffix`) against plain decoding,
one request at a time (what an agent waiting on its next step sees), on the small model trained by
benchmarks/train_small.py (random weights never copy their context, and their greedy loops would flatter
prompt lookup).

Two workloads of held-out standard-library code (never seen in training):
- copy: an agent rewriting a file it was shown: the prompt shows a code chunk, then the first tokens of
  the same chunk again; the model copies the rest (what prompt lookup is for);
- fresh: the prompt is code and the model continues it with new text (greedy; a small model's greedy
  text loops, which prompt lookup predicts, so drafts are often right here after all);
- sampled: the fresh prompts at temperature 1.0 (seeded per request): the output is new text, drafts are
  rarely right, so the adaptive k must keep the cost of trying near zero (target >= 0.95x).

Every speculative run's greedy tokens are compared with the plain run's: they must be identical. Sampled
rows draw different random numbers with and without drafts (rejection sampling keeps the distribution,
not the draws), so only their speed is compared.

    python benchmarks/train_small.py                       # once (cached under ~/.cache/loom/trained)
    python benchmarks/spec_decode.py --json benchmarks/results/spec_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_small import held_out_chunks, model_dir  # noqa: E402

from loom import LLM, SamplingParams  # noqa: E402

METHODS = {
    "off": None,
    "ngram k=4": {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_min": 2,
        "prompt_lookup_max": 4,
    },
    "ngram k=8": {
        "method": "ngram",
        "num_speculative_tokens": 8,
        "prompt_lookup_min": 2,
        "prompt_lookup_max": 4,
    },
    "suffix k=8": {"method": "suffix", "num_speculative_tokens": 8},
}


def workloads(tokenizer, n: int, length: int, shown: int, out_len: int) -> dict[str, list[list[int]]]:
    chunks = held_out_chunks(tokenizer, 2 * n, length, seed=1)
    fresh = [c[: length - out_len] for c in chunks[n:]]
    return {"copy": [c + c[:shown] for c in chunks[:n]], "fresh": fresh, "sampled": fresh}


TEMPERATURE = {"copy": 0.0, "fresh": 0.0, "sampled": 1.0}


def self_repeat_share(outputs: list[list[int]], n: int = 4) -> float:
    """Share of output tokens whose preceding n tokens already appeared earlier in the same output: how
    much a greedy loop (repeating itself, not the prompt) could flatter prompt lookup."""
    hits = total = 0
    for out in outputs:
        seen: set[tuple[int, ...]] = set()
        for i in range(n, len(out)):
            key = tuple(out[i - n : i])
            hits += key in seen
            total += 1
            seen.add(key)
    return hits / max(1, total)


def run(
    llm: LLM, prompts: list[list[int]], max_tokens: int, temperature: float
) -> tuple[float, list[list[int]], dict]:
    def params(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=True)

    llm.generate([prompts[0]], params(0), use_tqdm=False)  # warm-up
    stats = llm.engine.scheduler.stats
    before = (stats.num_draft_tokens, stats.num_accepted_tokens)
    outputs, tokens, t0 = [], 0, time.perf_counter()
    for i, p in enumerate(prompts):  # concurrency 1
        o = llm.generate([p], params(i), use_tqdm=False)[0].outputs[0]
        outputs.append(list(o.token_ids))
        tokens += len(o.token_ids)
    elapsed = time.perf_counter() - t0
    drafts = stats.num_draft_tokens - before[0]
    accepted = stats.num_accepted_tokens - before[1]
    return tokens / elapsed, outputs, {"draft_tokens": drafts, "accepted_tokens": accepted}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help=f"default {model_dir()}")
    parser.add_argument("--num-prompts", type=int, default=12)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--shown", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    path = args.model or model_dir()
    if not (path / "config.json").exists():
        print(f"no trained model at {path}: run benchmarks/train_small.py first", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    loads = [os.getloadavg()[0]]
    prompts = workloads(
        AutoTokenizer.from_pretrained(path), args.num_prompts, args.chunk_tokens, args.shown, args.output_len
    )
    rows, reference = [], {}
    for name, spec in METHODS.items():
        llm = LLM(
            model=str(path), dtype=args.dtype, num_threads=args.threads, speculative_config=spec,
            enable_prefix_caching=False,
        )  # fmt: skip
        for wl, ps in prompts.items():
            tok_s, outs, counts = run(llm, ps, args.output_len, TEMPERATURE[wl])
            if name == "off":
                reference[wl] = outs
                counts["self_repeat_share"] = self_repeat_share(outs)
            same = outs == reference[wl] if TEMPERATURE[wl] == 0 else None
            rows.append({"workload": wl, "method": name, "tok_s": tok_s, "identical_to_off": same, **counts})
            print(f"{wl:6} {name:11} {tok_s:7.1f} tok/s identical={same} {counts}", flush=True)
        del llm
    loads.append(os.getloadavg()[0])
    print(f"\n{args.num_prompts} prompts per workload, {args.output_len} tokens each, concurrency 1, "
          f"{args.dtype}, {args.threads} thread(s); load average {loads[0]:.1f} before / {loads[1]:.1f} after\n")  # fmt: skip
    for wl in prompts:
        share = next(r["self_repeat_share"] for r in rows if r["workload"] == wl and r["method"] == "off")
        print(f"{wl}: {share:.0%} of plain output tokens follow a 4-gram the output already had")
    print()
    print("| workload | method | tok/s | vs off | acceptance | greedy identical |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        base = next(x["tok_s"] for x in rows if x["workload"] == r["workload"] and x["method"] == "off")
        acc = f"{r['accepted_tokens'] / r['draft_tokens']:.0%}" if r["draft_tokens"] else "-"
        same = {True: "yes", False: "NO", None: "n/a (sampled)"}[r["identical_to_off"]]
        print(
            f"| {r['workload']} | {r['method']} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | {acc} | {same} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"model": str(path)}, "load": loads,
                                         "rows": rows}, indent=2, default=str) + "\n")  # fmt: skip
    return 0 if all(r["identical_to_off"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
