"""loom's CPU GEMV kernels (loom/kernels/gemv.c) against torch's paths, as a decode step meets them.

One pass runs every linear of a model's decoder layers once (the 89M Llama: 12 layers of qkv, o,
gate_up, down), each layer's weights distinct, so they come from memory as in a real step rather than
from cache as in a one-layer loop. Rows: 1 (batch-1 decode) up to a prefill chunk. Systems, per row
count: float32 F.linear (a float32 copy of a bf16 weight: `Float32Compute`), loom's bf16 path
(`Bf16Widened`: loom's panel kernel at every row count), torch's
`_weight_int8pack_mm` and loom's int8 path, torch's int4 kernel. Rounds alternate the systems; each
figure is the median round, in ms per pass, with loom's speed-up over torch's path beside it.

    .venv/bin/python benchmarks/cpu_kernels.py [--threads 1] [--rows 1 4 16 64 128] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from loom.kernels import cpu
from loom.layers.linear import Linear
from loom.layers.quant import Bf16Widened, Int4, Int8, process_linears
from loom.layers.quant.int4 import quantize_int4
from loom.layers.quant.int8 import quantize_int8

# (in_features, out_features) of one decoder layer of the 89M Llama (hidden 768, 12 heads / 4 kv heads
# of 64, intermediate 2432): qkv, o, gate_up, down.
LAYER = [(768, 1280), (768, 768), (768, 4864), (2432, 768)]


def build(layers: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weights = [[torch.randn(n, k, generator=gen).bfloat16() for k, n in LAYER] for _ in range(layers)]

    def linears(method):
        out = []
        for ws in weights:
            for w in ws:
                layer = Linear(w.shape[1], w.shape[0]).to(torch.bfloat16)
                layer.weight.data.copy_(w)
                process_linears(layer, method)
                out.append(layer)
        return out

    fp32 = [[w.float() for w in ws] for ws in weights]
    int8 = linears(Int8())
    torch_int8 = [quantize_int8(w) for ws in weights for w in ws]
    loom_int4 = linears(Int4(32))
    int4 = []
    for ws in weights:
        for w in ws:
            q, scale, zero = quantize_int4(w, 32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            int4.append((packed, torch.stack([scale, zero], -1).transpose(0, 1).contiguous(), w.shape[1]))
    return {
        "float32 F.linear": lambda x: [F.linear(x[w.shape[1]].float(), w) for ws in fp32 for w in ws],
        "loom bf16": (lambda ls: lambda x: [layer(x[layer.in_features]) for layer in ls])(
            linears(Bf16Widened())
        ),
        "torch int8": lambda x: [
            torch.ops.aten._weight_int8pack_mm(x[q.shape[1]], q, scale) for q, scale in torch_int8
        ],
        "loom int8": lambda x: [layer(x[layer.in_features]) for layer in int8],
        "torch int4 g32": lambda x: [
            torch.ops.aten._weight_int4pack_mm_for_cpu(x[k], p, 32, sz) for p, sz, k in int4
        ],
        "loom int4 g32": lambda x: [layer(x[layer.in_features]) for layer in loom_int4],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 128])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu.available():
        sys.exit("loom's CPU kernels do not run here (no C compiler, or no AVX2/FMA)")
    systems = build(args.layers)
    results = []
    print(
        f"threads {args.threads}, load average {os.getloadavg()[0]:.2f}; ms per pass over {args.layers} layers"
    )
    print(
        "| rows | " + " | ".join(systems)
        + " | loom bf16 / float32 | loom int8 / torch int8 | loom int4 / torch int4 |"
    )  # fmt: skip
    print("|---:|" + "---:|" * (len(systems) + 3))
    for rows in args.rows:
        x = {k: torch.randn(rows, k).bfloat16() for k, _ in LAYER}
        times = {name: [] for name in systems}
        for fn in systems.values():
            fn(x)  # warm up
        for _ in range(args.rounds):
            for name, fn in systems.items():
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        results.append({"rows": rows, "ms": med})
        cells = " | ".join(f"{v:.1f}" for v in med.values())
        bf = med["float32 F.linear"] / med["loom bf16"]
        i8 = med["torch int8"] / med["loom int8"]
        i4 = med["torch int4 g32"] / med["loom int4 g32"]
        print(f"| {rows} | {cells} | {bf:.2f}x | {i8:.2f}x | {i4:.2f}x |", flush=True)
    if args.json:
        args.json.write_text(
            json.dumps({"threads": args.threads, "layers": args.layers, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
