"""Batch-1 decode speed of loom's precisions beside HF transformers, in one run.

Two random-weight Llamas (speed does not depend on the values): the 271M shape (hidden 1024, 16 layers,
16 heads, MLP 2816, vocab 32000, untied: the model llama.cpp's q8_0 / q4_k_m figures in issue 15 were
measured on) and the built-in 88M `small` model. One request, a 32-token prompt, greedy, EOS ignored;
decode speed is N / (time to generate N + 1 tokens - time to generate 1), so prefill is not counted.
Systems are measured in interleaved rounds (the machine is shared; each figure is the best round).

    nice -n 10 .venv/bin/python benchmarks/quant_decode.py [--tokens 64] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from loom import LLM, SamplingParams
from loom.bench.systems import load_hf
from loom.layers.quant import weight_bytes
from loom.models.tiny import default_model_dir
from loom.paths import cache_dir

SHAPE_271M = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
)
# (system, dtype, quantization, group size)
SYSTEMS = [
    ("loom", "float32", None, 128),
    ("loom", "bfloat16", None, 128),
    ("loom", "bfloat16", "int8", 128),
    ("loom", "bfloat16", "int4", 128),
    ("loom", "bfloat16", "int4", 32),
    ("hf", "float32", None, 0),
    ("hf", "bfloat16", None, 0),
]


def make_271m(out: Path) -> Path:
    """A random-weight Llama of the 271M shape with a byte-level BPE tokenizer of the same vocabulary,
    trained on the Python standard library's source (llama.cpp's GGUF converter needs BPE merges: the
    word-level tokenizer this used before could not be served by llama.cpp)."""
    if (out / "config.json").is_file():
        return out
    import sysconfig

    from transformers import LlamaConfig, LlamaForCausalLM

    from loom.models.tiny import build_tokenizer

    tmp = out.with_name(out.name + ".tmp")
    lines = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:3000]:
        try:
            lines += path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
    build_tokenizer(lines, vocab_size=SHAPE_271M["vocab_size"]).save_pretrained(tmp)
    config = LlamaConfig(
        **SHAPE_271M,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=2,  # the tokenizer's <|im_end|>
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out)
    return out


def label(system: str, dtype: str, quantization: str | None, group_size: int) -> str:
    if quantization is None:
        return f"{system} {dtype}"
    return f"{system} {quantization}" + (f" g{group_size}" if quantization == "int4" else "") + f" ({dtype})"


def loom_runner(path: Path, dtype: str, quantization: str | None, group_size: int, threads: int):
    llm = LLM(
        str(path),
        dtype=dtype,
        quantization=quantization,
        quantization_group_size=group_size,
        num_threads=threads,
        num_blocks=32,
        enable_prefix_caching=False,
    )

    def generate(prompt: list[int], n: int) -> list[int]:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids

    return generate, weight_bytes(llm.engine.runner.model)


def hf_runner(path: Path, dtype: str):
    model = load_hf(path, dtype)

    def generate(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0
            )
        return out[0, len(prompt) :].tolist()

    return generate, sum(p.numel() * p.element_size() for p in model.parameters())


def rss_growth_mib(path: Path, dtype: str, quantization: str | None, group_size: int) -> float:
    """Resident memory a fresh process gains by building the engine (weights, a small KV pool, buffers):
    what the weights really cost once the float copies are freed."""
    code = (
        "import os; from loom import LLM; page = os.sysconf('SC_PAGE_SIZE'); "
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * page; before = rss(); "
        f"LLM({str(path)!r}, dtype={dtype!r}, quantization={quantization!r}, "
        f"quantization_group_size={group_size}, num_blocks=32, num_threads=1); "
        "print((rss() - before) / 2**20)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def decode_tok_s(generate, prompt: list[int], n: int) -> float:
    t0 = time.perf_counter()
    generate(prompt, 1)
    t1 = time.perf_counter()
    out = generate(prompt, n + 1)
    t2 = time.perf_counter()
    assert len(out) == n + 1
    return n / ((t2 - t1) - (t1 - t0))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["271m", "88m"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = cache_dir("bench")
    paths = {
        "271m": lambda: make_271m(cache / "llama-271m-random-bpe"),
        "88m": lambda: default_model_dir("llama", "small"),
    }
    load = os.getloadavg()
    results = []
    for name in args.models:
        path = paths[name]()
        prompt = [random.Random(0).randrange(3, 2000) for _ in range(32)]
        runners = {}
        for system, dtype, quantization, group_size in SYSTEMS:
            key = label(system, dtype, quantization, group_size)
            if system == "loom":
                runners[key] = loom_runner(path, dtype, quantization, group_size, args.threads)
            else:
                runners[key] = hf_runner(path, dtype)
            runners[key][0](prompt, 2)  # warm-up
        best: dict[str, float] = {}
        for r in range(args.rounds):
            for key, (generate, _) in runners.items():
                tok_s = decode_tok_s(generate, prompt, args.tokens)
                best[key] = max(best.get(key, 0.0), tok_s)
                print(f"{name} round {r} {key}: {tok_s:.1f} tok/s", flush=True)
        for (system, dtype, quantization, group_size), (key, (_, nbytes)) in zip(
            SYSTEMS, runners.items(), strict=True
        ):
            rss = rss_growth_mib(path, dtype, quantization, group_size) if system == "loom" else None
            results.append(
                {
                    "model": name,
                    "system": key,
                    "tok_s": best[key],
                    "weight_MiB": nbytes / 2**20,
                    "rss_MiB": rss,
                }
            )
        del runners
    load_after = os.getloadavg()

    print(f"\nload average before {load[0]:.1f} / after {load_after[0]:.1f}, {args.threads} threads\n")
    print(
        "| model | system | weights MiB | engine RSS MiB | decode tok/s | vs HF same dtype | vs loom bf16 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        same = [x for x in results if x["model"] == r["model"]]
        by = {x["system"]: x["tok_s"] for x in same}
        dtype = "float32" if "float32" in r["system"] else "bfloat16"
        hf = by.get(f"hf {dtype}")
        print(
            f"| {r['model']} | {r['system']} | {r['weight_MiB']:.0f} | "
            + (f"{r['rss_MiB']:.0f}" if r["rss_MiB"] is not None else "")
            + f" | {r['tok_s']:.1f} "
            f"| {r['tok_s'] / hf:.2f}x | {r['tok_s'] / by['loom bfloat16']:.2f}x |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"load_before": load, "load_after": load_after, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
