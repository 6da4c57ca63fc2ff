"""Accuracy of loom's weight-only quantization against float, on the small model train_small.py trained
(random weights would say nothing: no outliers, no structure, every weight equally important).

Fixed prompt set: 32 spans of 64 tokens of held-out standard-library code. For each configuration:
- greedy agreement: the share of 64 greedily generated tokens per prompt identical, position by position,
  to the float32 (and to the bfloat16) model's greedy continuation;
- teacher-forced top-1 agreement and mean KL(float || quantized) of the next-token distributions (full
  vocabulary, natural log) over the same 32 x 64 positions of prompt + float32 continuation.
Quantized models keep lm_head in int8 unless a row says otherwise (those rows measure that choice).

    .venv/bin/python benchmarks/quant_accuracy.py [--model DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_small import held_out_chunks, model_dir  # noqa: E402

from loom import LLM, SamplingParams  # noqa: E402
from loom.layers.attention import AttentionMetadata, KVCache, PrefillSeq  # noqa: E402
from loom.layers.quant import UNQUANTIZED, Int4, LinearMethod, weight_bytes  # noqa: E402
from loom.models.loader import load_model  # noqa: E402

PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 32, 64, 64
# (dtype, quantization, group size, lm_head override, label); without an override, lm_head is int8 in
# every quantized model (loom.layers.quant.lm_head_method): the rows with one measure that choice.
CONFIGS: list[tuple[str, str | None, int, LinearMethod | None, str]] = [
    ("float32", None, 128, None, "float32"),
    ("bfloat16", None, 128, None, "bfloat16"),
    ("float32", "int8", 128, None, "int8"),
    ("bfloat16", "int8", 128, None, "int8"),
    ("bfloat16", "int8", 128, UNQUANTIZED, "int8, lm_head float"),
    ("float32", "int4", 32, None, "int4 g32"),
    ("bfloat16", "int4", 32, None, "int4 g32"),
    ("bfloat16", "int4", 64, None, "int4 g64"),
    ("bfloat16", "int4", 128, None, "int4 g128"),
    ("bfloat16", "int4", 32, Int4(32), "int4 g32, lm_head int4"),
    ("bfloat16", "int4", 128, Int4(128), "int4 g128, lm_head int4"),
    ("bfloat16", "int4", 32, UNQUANTIZED, "int4 g32, lm_head float"),
]


@torch.inference_mode()
def full_logprobs(model, tokens: list[int], dtype: torch.dtype) -> torch.Tensor:
    """[len(tokens), vocab] next-token log-probabilities: one prefill through loom's model (own KV cache)."""
    cfg, block = model.config, 16
    blocks = math.ceil(len(tokens) / block)
    caches = [
        KVCache(torch.zeros(2, cfg.num_kv_heads, blocks, block, cfg.head_dim, dtype=dtype))
        for _ in range(cfg.num_layers)
    ]
    n = len(tokens)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), block_size=block, prefills=[PrefillSeq(0, n, 0, torch.arange(blocks))]
    )
    hidden = model(torch.tensor(tokens), torch.arange(n), caches, meta)
    return model.compute_logits(hidden).float().log_softmax(-1)


def make_llm(path: Path, dtype: str, quantization: str | None, group_size: int, lm_head) -> LLM:
    llm = LLM(
        str(path),
        dtype=dtype,
        quantization=quantization,
        quantization_group_size=group_size,
        num_blocks=512,
        num_threads=2,
    )
    if lm_head is not None:
        runner = llm.engine.runner
        runner.model = load_model(
            path, runner.dtype, runner.device, quantization, group_size, lm_head=lm_head
        )
    return llm


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=model_dir())
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--prompts", type=int, default=PROMPTS)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    chunks = held_out_chunks(AutoTokenizer.from_pretrained(args.model), args.prompts, PROMPT_TOKENS, seed=1)
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)

    rows, refs = [], {}
    for dtype, quantization, group_size, lm_head, label in CONFIGS:
        t0 = time.time()
        llm = make_llm(args.model, dtype, quantization, group_size, lm_head)
        model, torch_dtype = llm.engine.runner.model, llm.engine.runner.dtype
        tokens = [o.outputs[0].token_ids for o in llm.generate(chunks, greedy, use_tqdm=False)]
        if quantization is None:
            refs[dtype] = tokens
        fp32_tokens = refs["float32"]
        # Teacher-forced on prompt + float32 continuation; positions predicting the continuation.
        logprobs = [
            full_logprobs(model, c + t, torch_dtype)[PROMPT_TOKENS - 1 : -1]
            for c, t in zip(chunks, fp32_tokens, strict=True)
        ]
        if (dtype, quantization) == ("float32", None):
            refs["logprobs"] = logprobs
        row = {"dtype": dtype, "config": label, "weight_MiB": weight_bytes(model) / 2**20}
        for ref in ("float32", "bfloat16"):
            if ref in refs:
                same = sum(
                    a == b for x, y in zip(tokens, refs[ref], strict=True) for a, b in zip(x, y, strict=True)
                )
                row[f"greedy_vs_{ref}"] = same / (len(chunks) * NEW_TOKENS)
        ref_lp = torch.cat(refs["logprobs"])
        lp = torch.cat(logprobs)
        row["top1_vs_float32"] = (lp.argmax(-1) == ref_lp.argmax(-1)).float().mean().item()
        row["kl_vs_float32"] = (ref_lp.exp() * (ref_lp - lp)).sum(-1).mean().item()
        rows.append(row)
        print(json.dumps(row), f"({time.time() - t0:.0f} s)", flush=True)
        del llm, model

    print()
    print("| model dtype | weights | MiB | greedy agreement vs fp32 | vs bf16 | top-1 vs fp32 | KL vs fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['config']} | {r['weight_MiB']:.1f} | {r.get('greedy_vs_float32', 1):.3f} "
            f"| {r.get('greedy_vs_bfloat16', float('nan')):.3f} | {r['top1_vs_float32']:.3f} "
            f"| {r['kl_vs_float32']:.5f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
