"""`loom run-batch -i in.jsonl -o out.jsonl`: a batch file run offline, in vLLM's run-batch format.

The same server app runs in-process (no port) and every line goes through its public API, as a batch
line on `loom serve` does, so the answers are those the server gives. Output lines, in input order, are
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`; failed lines are in
the same file (as vLLM writes them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from loom.config import EngineConfig
from loom.jobs.batch_runner import LineRunner
from loom.jobs.batches import ENDPOINTS, output_line
from loom.jobs.files import check_batch_jsonl
from loom.jobs.service import INTERNAL_BASE_URL

logger = logging.getLogger(__name__)


async def run_batch(
    lines: list[dict[str, Any]],
    engine_config: EngineConfig,
    concurrency: int = 64,
    served_model_name: str | None = None,
) -> list[str]:
    """The output line of each input line, in order."""
    from loom.entrypoints.server.app import create_app
    from loom.entrypoints.server.config import ServerConfig

    with tempfile.TemporaryDirectory(prefix="loom-run-batch-") as state_dir:
        # Offline nothing waits to be served interactively, so no admission limit holds the batch back.
        config = ServerConfig(
            state_dir=state_dir, max_waiting=max(256, concurrency), served_model_name=served_model_name
        )
        app = create_app(engine_config, config)
        async with app.router.lifespan_context(app):
            engine = app.state.loom.engine
            await asyncio.to_thread(engine.wait_ready)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url=INTERNAL_BASE_URL, timeout=None
            ) as client:
                return await _run_lines(LineRunner(client), lines, concurrency)


async def _run_lines(runner: LineRunner, lines: list[dict[str, Any]], concurrency: int) -> list[str]:
    gate = asyncio.Semaphore(concurrency)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(lines), desc="requests", unit="req", file=sys.stderr)

    async def one(seq: int, line: dict[str, Any]) -> str:
        url = line.get("url")
        payload = {"endpoint": url if url in ENDPOINTS else ENDPOINTS[0], "line": line}
        async with gate:
            while True:
                result = await runner.run(payload)
                if result is not None:
                    break
                await asyncio.sleep(0.5)  # 429/503: the server is full; try again
        if bar is not None:
            bar.update(1)
        return output_line(line["custom_id"], f"run-batch:{seq}", result, "batch_failed")

    try:
        return await asyncio.gather(*(one(i, line) for i, line in enumerate(lines)))
    finally:
        if bar is not None:
            bar.close()


def cmd_run_batch(args: argparse.Namespace) -> None:
    from loom.entrypoints.cli import engine_config_from_args

    data = Path(args.input).read_bytes()
    check_batch_jsonl(data)
    lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    outputs = asyncio.run(
        run_batch(lines, engine_config_from_args(args), args.concurrency, args.served_model_name)
    )
    Path(args.output).write_text("".join(o + "\n" for o in outputs))
    failed = sum(
        json.loads(o)["error"] is not None or json.loads(o)["response"]["status_code"] >= 400 for o in outputs
    )
    logger.info("wrote %d answers to %s (%d failed)", len(outputs), args.output, failed)


def add_run_batch_parser(subparsers: Any) -> None:
    from loom.entrypoints.cli import add_engine_args

    p = subparsers.add_parser(
        "run-batch",
        help="run a batch file (OpenAI batch JSONL) offline and write the answers as JSONL",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-i", "--input", required=True, help="the batch file: one request per line")
    p.add_argument("-o", "--output", required=True, help="where to write one answer per line")
    p.add_argument("--concurrency", type=int, default=64, help="most lines in flight at once")
    p.add_argument(
        "--served-model-name", help="the model name the lines' bodies use (default: --model, or loom-tiny)"
    )
    add_engine_args(p)
    p.set_defaults(func=cmd_run_batch)
