"""Prefix reuse on agent-shaped traffic, with prefix caching on vs off in the same run.

1. One agent session: a 1,536-token system prompt, then 8 turns, each adding 48 user tokens and
   generating 8 tokens; each turn is sent after the previous one finished, carrying the whole history
   (previous answers included). Reports the time of the follow-up turns (2..8).
2. Fan-out: 8 parallel branches sharing a 1,536-token context (+32 own tokens each): prefill tokens
   actually computed, and wall time.
3. Cost at 0% hits: 32 unique prompts, caching on vs off (the hashing and lookups must cost ~nothing).

    python benchmarks/agent_trace.py [--model DIR] [--dtype bfloat16] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from loom import LLM, SamplingParams
from loom.models.tiny import default_model_dir

SYSTEM_TOKENS, TURNS, USER_TOKENS, NEW_TOKENS = 1536, 8, 48, 8


def rand_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 2048) for _ in range(n)]


def agent_session(llm: LLM, seed: int) -> tuple[float, float, int]:
    """Returns (first turn seconds, follow-up turns seconds, prompt tokens computed in follow-ups)."""
    rng = random.Random(seed)
    history = rand_tokens(rng, SYSTEM_TOKENS)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    first = follow = 0.0
    computed_before = 0
    for turn in range(TURNS):
        history = history + rand_tokens(rng, USER_TOKENS)
        if turn == 1:
            computed_before = llm.engine.stats.num_prompt_tokens_computed
        t = time.perf_counter()
        out = llm.generate([history], params, use_tqdm=False)[0]
        dt = time.perf_counter() - t
        history = history + out.outputs[0].token_ids
        if turn == 0:
            first = dt
        else:
            follow += dt
    return first, follow, llm.engine.stats.num_prompt_tokens_computed - computed_before


def fan_out(llm: LLM, seed: int) -> tuple[float, int]:
    rng = random.Random(seed)
    shared = rand_tokens(rng, SYSTEM_TOKENS)
    prompts = [shared + rand_tokens(rng, 32) for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    before = llm.engine.stats.num_prompt_tokens_computed
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t, llm.engine.stats.num_prompt_tokens_computed - before


def zero_hits(llm: LLM, seed: int) -> float:
    rng = random.Random(seed)
    prompts = [rand_tokens(rng, rng.randint(64, 512)) for _ in range(32)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the built-in ~88M llama)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="0%%-hit runs per setting (median)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or str(default_model_dir("llama", "small"))
    engines = {
        on: LLM(
            model,
            dtype=args.dtype,
            num_threads=args.threads,
            enable_prefix_caching=on,
            kv_cache_memory_bytes=2**30,
        )
        for on in (True, False)
    }
    for llm in engines.values():  # warm-up
        llm.generate([[5] * 64], SamplingParams(max_tokens=4), use_tqdm=False)

    rows = []
    res = {on: agent_session(engines[on], seed=1) for on in (True, False)}
    rows.append(
        (
            "agent session: follow-up turns 2-8, seconds",
            res[True][1],
            res[False][1],
            res[False][1] / res[True][1],
        )
    )
    rows.append(
        (
            "agent session: follow-up prompt tokens computed",
            res[True][2],
            res[False][2],
            res[False][2] / max(res[True][2], 1),
        )
    )
    fan = {on: fan_out(engines[on], seed=2) for on in (True, False)}
    rows.append(("fan-out x8: seconds", fan[True][0], fan[False][0], fan[False][0] / fan[True][0]))
    rows.append(
        (
            "fan-out x8: prefill tokens computed",
            fan[True][1],
            fan[False][1],
            fan[False][1] / max(fan[True][1], 1),
        )
    )
    zero = {
        on: sorted(zero_hits(engines[on], seed=3 + r) for r in range(args.repeats))[args.repeats // 2]
        for on in (True, False)
    }
    rows.append(("0% hits (32 unique prompts): seconds", zero[True], zero[False], zero[False] / zero[True]))

    print(
        f"\nmodel {model}, {args.dtype}, {args.threads} threads; ratio = off / on (higher is better for caching)\n"
    )
    print("| measure | caching on | caching off | off / on |")
    print("|---|---:|---:|---:|")
    for name, on, off, ratio in rows:
        fmt = (lambda v: f"{v:.3f}") if isinstance(on, float) else (lambda v: f"{v}")
        print(f"| {name} | {fmt(on)} | {fmt(off)} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
