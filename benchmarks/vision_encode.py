"""What one phone screenshot costs in GLM-4.1V's vision tower on this CPU, at several `max_pixels`
(`--mm-processor-kwargs '{"max_pixels": N}'`): preprocessing (resize + normalize), then the full-size
tower (24 blocks, width 1536, the 2x2 merger into 4096: AutoGLM-Phone-9B's shape, random weights; the
cost does not depend on the weights), and the image tokens the decoder then prefills.

    python benchmarks/vision_encode.py --max-pixels 100000 250000 500000 --json benchmarks/results/vision_encode.json

Open-AutoGLM's README serves with max_pixels 5,000,000, which on a 1080x2400 screenshot keeps it near full
resolution (about 3,300 image tokens); the tower's cost grows faster than linearly with the patch count
(attention over all patches of the image), so the largest settings take minutes on 2 cores: pass them
explicitly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from loom.bench.screens import screenshot
from loom.models.config import VisionConfig
from loom.models.glm4v_vision import Glm4vVisionModel
from loom.multimodal.media import LoadedImage
from loom.multimodal.processor import ImageProcessor, ImageProcessorConfig


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-pixels", type=int, nargs="+", default=[100_000, 250_000, 500_000])
    parser.add_argument("--screen", default="1080x2400")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    width, height = (int(v) for v in args.screen.split("x"))
    image = LoadedImage(screenshot(width, height, seed=0), content_hash="bench")
    tower = Glm4vVisionModel(VisionConfig()).to(dtype).eval()
    params = sum(p.numel() for p in tower.parameters())
    load = [os.getloadavg()[0]]
    rows = []
    for max_pixels in args.max_pixels:
        processor = ImageProcessor(ImageProcessorConfig(max_pixels=max_pixels))
        t0 = time.perf_counter()
        processed = processor(image)
        pre_s = time.perf_counter() - t0
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = tower(processed.pixel_values.to(dtype), [processed.grid_thw])[0]
            encode_s = time.perf_counter() - t0
        t, h, w = processed.grid_thw
        row = {
            "max_pixels": max_pixels,
            "resized": f"{w * 14}x{h * 14}",
            "patches": t * h * w,
            "image_tokens": out.shape[0],
            "preprocess_s": pre_s,
            "encode_s": encode_s,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    load.append(os.getloadavg()[0])
    print(
        f"\n{args.screen} screenshot, vision tower {params / 1e6:.0f}M parameters, {args.dtype}, "
        f"{args.threads} threads, load average {load[0]:.1f} before / {load[1]:.1f} after\n"
    )
    print("| max_pixels | resized to | patches | image tokens | preprocess s | vision encode s |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['max_pixels']:,} | {r['resized']} | {r['patches']:,} | {r['image_tokens']:,} | "
            f"{r['preprocess_s']:.2f} | {r['encode_s']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args), "load": load, "rows": rows}, indent=2,
                                        default=str) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
