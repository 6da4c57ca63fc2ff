"""The `loom` command. Engine flags are generated from EngineConfig's fields and their docstrings."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from loom.agent.cli import add_run_parser
from loom.bench.cli import add_bench_parser
from loom.config import EngineConfig, add_config_args, config_from_args
from loom.entrypoints.server.cli import add_serve_parser
from loom.jobs.offline import add_run_batch_parser


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, EngineConfig, "engine")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return config_from_args(args, EngineConfig)


def cmd_make_tiny(args: argparse.Namespace) -> None:
    from loom.models.tiny import make_tiny

    if args.arch == "glm4v" and args.size != "tiny":
        raise SystemExit("loom make-tiny: error: --arch glm4v comes in --size tiny only")
    path = make_tiny(args.out, arch=args.arch, size=args.size, seed=args.seed)
    print(path)


def cmd_generate(args: argparse.Namespace) -> None:
    from loom import LLM, SamplingParams

    llm = LLM(**vars(engine_config_from_args(args)))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.sampling_seed)
    prompts = args.prompt or ["The quick brown fox", "def fibonacci(n):"]
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        c = out.outputs[0]
        print(
            json.dumps(
                {
                    "prompt": prompt,
                    "text": c.text,
                    "tokens": len(c.token_ids),
                    "finish_reason": c.finish_reason,
                }
            )
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="Run LLM agents fast.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "make-tiny", help="write a random-weight tiny checkpoint with a locally trained tokenizer"
    )
    p.add_argument("--arch", choices=["llama", "qwen2", "glm", "glm4", "glm4v"], default="llama")
    p.add_argument("--size", choices=["tiny", "small"], default="tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("generate", help="generate offline for a few prompts and print JSON lines")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--sampling-seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)

    add_serve_parser(sub)
    add_run_parser(sub)
    add_run_batch_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
