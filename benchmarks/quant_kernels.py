"""The CPU kernels behind loom's quantized linears, timed against float F.linear on this machine.

For each layer shape of the 271M Llama (and its lm_head) and each row count (1: batch-1 decode; 16, 32:
batched decode; 256: a prefill chunk), one linear's time with: F.linear in float32 and bfloat16, and
torch's int8 and int4 weight-only kernels fed float32 or bfloat16 activations. Each figure is the fastest
of many single calls (the machine may be shared; the fastest is the least disturbed).

    nice -n 10 .venv/bin/python benchmarks/quant_kernels.py [--threads 2] [--rows 1 16 32 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from loom.layers.quant.int4 import dequantize_int4, quantize_int4
from loom.layers.quant.int8 import dequantize_int8, quantize_int8

SHAPES = {  # name: (out_features, in_features)
    "qkv_proj": (3072, 1024),
    "o_proj": (1024, 1024),
    "gate_up_proj": (5632, 1024),
    "down_proj": (1024, 2816),
    "lm_head": (32000, 1024),
}


def best_us(fn, budget_s: float = 1.0, min_calls: int = 5) -> float:
    """The fastest of many single calls: on a shared machine, the least disturbed one."""
    fn()
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_calls or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e6


def kernels(out_f: int, in_f: int):
    """name -> (weights in the kernel's form, fn(x) -> y); x comes in the dtype the name says."""
    w = torch.randn(out_f, in_f) * 0.02
    w_bf16 = w.bfloat16()
    q8, s8 = quantize_int8(w)
    fns = {
        "f32 F.linear": (torch.float32, lambda x: F.linear(x, w)),
        "bf16 F.linear": (torch.bfloat16, lambda x: F.linear(x, w_bf16)),
        "int8 (f32 x)": (torch.float32, lambda x: torch.ops.aten._weight_int8pack_mm(x, q8, s8.float())),
        "int8 (bf16 x)": (torch.bfloat16, lambda x: torch.ops.aten._weight_int8pack_mm(x, q8, s8)),
    }
    fns["int8 dequant + f32 F.linear"] = (
        torch.bfloat16,
        lambda x: F.linear(x.float(), dequantize_int8(q8, s8)).to(torch.bfloat16),
    )
    for g in (32, 128):
        q, scale, zero = quantize_int4(w, g)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
        sz32 = sz.float()
        fns[f"int4 g{g} (f32 x)"] = (
            torch.float32,
            lambda x, p=packed, s=sz32, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, g, s),
        )
        fns[f"int4 g{g} (bf16 x)"] = (
            torch.bfloat16,
            lambda x, p=packed, s=sz, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, g, s),
        )
        fns[f"int4 g{g} dequant + f32 F.linear"] = (
            torch.bfloat16,
            lambda x, q=q, s=scale, z=zero: F.linear(x.float(), dequantize_int4(q, s, z)).to(torch.bfloat16),
        )
    return fns


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 64, 128, 256])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = []
    for name in args.shapes:
        out_f, in_f = SHAPES[name]
        fns = kernels(out_f, in_f)
        for rows in args.rows:
            x32 = torch.randn(rows, in_f)
            xs = {torch.float32: x32, torch.bfloat16: x32.bfloat16()}
            # The float32-activation kernels are scalar code on AVX2 (seconds per call at 256 rows).
            times = {
                k: best_us(lambda f=f, x=xs[dt]: f(x)) if rows <= 32 or "f32 x" not in k else float("nan")
                for k, (dt, f) in fns.items()
            }
            results.append({"shape": name, "out": out_f, "in": in_f, "rows": rows, "us": times})
            print(
                f"{name} [{rows} x {in_f}] x [{in_f} x {out_f}]: "
                + ", ".join(f"{k} {v:.0f}" for k, v in times.items()),
                flush=True,
            )
    print(f"\nload average after: {os.getloadavg()[0]:.1f}\n")
    names = list(results[0]["us"])
    print("| layer | rows | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for r in results:
        base = r["us"]["bf16 F.linear"]
        cells = [f"{v:.0f} us ({base / v:.2f}x)" for v in r["us"].values()]
        print(f"| {r['shape']} | {r['rows']} | " + " | ".join(cells) + " |")
    print("\n(x: speed relative to bf16 F.linear)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
