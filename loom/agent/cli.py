"""`loom run WORKFLOW.yaml`: run an agent workflow and print its outputs as JSON.

Without --base-url the workflow runs on an in-process engine (the engine flags apply; --model is a
model directory, the built-in tiny model by default). With --base-url it runs against any
OpenAI-compatible server and --model names the served model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from loom.agent.builtin_tools import builtin_tools
from loom.agent.clients import ChatClient, EngineClient, OpenAIClient
from loom.agent.events import Event
from loom.agent.graph import LLMNode, Workflow
from loom.agent.loader import load_workflow
from loom.agent.record import RunRecord
from loom.agent.runtime import POLICIES, RunResult, Runtime
from loom.errors import LoomError

logger = logging.getLogger(__name__)

_DONE = ("node_finished", "node_failed", "node_skipped", "node_cancelled")


def parse_inputs(items: list[str]) -> dict[str, str]:
    """`key=value` pairs; a value `@path` is the text of that file (for long contexts)."""
    inputs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--input expects KEY=VALUE (or KEY=@FILE), got {item!r}")
        inputs[key] = Path(value[1:]).read_text() if value.startswith("@") else value
    return inputs


class Progress:
    """Shows a run on the terminal: a bar when stderr is a terminal, log lines otherwise."""

    def __init__(self, total: int, quiet: bool = False):
        self.quiet = quiet
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="nodes", unit="node", file=sys.stderr)

    def __call__(self, event: Event) -> None:
        if self.quiet or event.kind == "token":
            return
        if self.bar is not None:
            if event.kind in _DONE:
                self.bar.update(1)
                self.bar.set_postfix_str(f"{event.node} {event.kind.removeprefix('node_')}")
            return
        detail = {k: v for k, v in event.data.items() if k != "output"}
        logger.info("[%7.2fs] %-14s %s %s", event.time, event.kind, event.node or "", detail or "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary(result: RunResult) -> dict[str, Any]:
    """What `loom run` prints: status, outputs, errors and token totals."""
    return {
        "status": result.status,
        "outputs": result.outputs,
        "errors": {n: f"{type(e).__name__}: {e}" for n, e in result.errors.items()},
        "skipped": result.skipped,
        "cancelled": result.cancelled,
        "program_id": result.record.program_id if result.record else None,
        "totals": result.record.totals if result.record else {},
    }


def _output_or_note(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False, default=str)
    except (ValueError, RecursionError) as e:
        return f"<not representable as JSON: {e}>"
    return value


def render_summary(result: RunResult) -> str:
    """The summary as strict JSON, whatever the outputs hold: an output JSON cannot carry (NaN or an
    infinity, an int past Python's int-to-str limit, nesting too deep) is replaced by a note saying
    why, rather than printed as `Infinity` or failing the print after the run did its work."""
    data = summary(result)
    data["outputs"] = {name: _output_or_note(v) for name, v in data["outputs"].items()}
    return json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False, default=str)


async def _run(
    args: argparse.Namespace, workflow: Workflow, client: ChatClient | None, records: list[RunRecord]
) -> RunResult:
    runtime = Runtime(client, builtin_tools(args.sandbox), policy=args.policy, deadline=args.deadline)
    progress = Progress(len(workflow.nodes), quiet=args.quiet)
    try:
        handle = runtime.start(workflow, parse_inputs(args.input), on_event=progress)
        records.append(handle.record)
        return await handle.wait()
    finally:
        progress.close()


async def _main(args: argparse.Namespace, records: list[RunRecord]) -> RunResult:
    workflow = load_workflow(args.workflow)
    if args.max_tokens is not None:
        workflow.sampling["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        workflow.sampling["temperature"] = args.temperature
    if args.base_url:
        return await _run(args, workflow, OpenAIClient(args.base_url, args.api_key, args.model), records)
    if not any(isinstance(node, LLMNode) for node in workflow.nodes.values()):
        return await _run(args, workflow, None, records)  # tools and functions only: no model to load
    from loom.entrypoints.cli import engine_config_from_args

    async with EngineClient.launch(engine_config_from_args(args)) as client:
        return await _run(args, workflow, client, records)


def cmd_run(args: argparse.Namespace) -> None:
    """Run the workflow, print the summary JSON on stdout, write the record and timeline if asked.

    The record is written however the run ends (an interrupt or a crash included), before anything
    else can fail."""
    records: list[RunRecord] = []
    try:
        result = asyncio.run(_main(args, records))
    except LoomError as e:  # a bad workflow, input or model: the message says what to fix
        raise SystemExit(f"error: {e}") from e
    finally:
        if args.record and records:
            records[0].save_json(args.record)
    if args.timeline:
        result.record.timeline_png(args.timeline)
    print(render_summary(result))
    if not result.ok:
        raise SystemExit(1)


def add_run_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `run` command to the `loom` CLI's subparsers."""
    from loom.entrypoints.cli import add_engine_args

    p = subparsers.add_parser(
        "run",
        help="run an agent workflow (YAML) and print its outputs as JSON",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("workflow", help="the workflow YAML file")
    p.add_argument(
        "--input",
        "-i",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a workflow input; KEY=@FILE reads a file",
    )
    p.add_argument(
        "--base-url",
        help="an OpenAI-compatible API (e.g. http://localhost:8000/v1); default: in-process engine",
    )
    p.add_argument("--api-key", help="API key for --base-url (default: $OPENAI_API_KEY)")
    p.add_argument(
        "--policy", choices=POLICIES, default="fail_fast", help="what a failed node does to the run"
    )
    p.add_argument("--deadline", type=float, help="seconds the whole run may take")
    p.add_argument("--max-tokens", type=int, help="default max_tokens of nodes that set none")
    p.add_argument("--temperature", type=float, help="default temperature of nodes that set none")
    p.add_argument("--sandbox", help="directory the read_file tool may read (read_file is off without it)")
    p.add_argument("--record", help="write the run record (per-node times, tokens, errors) as JSON here")
    p.add_argument("--timeline", help="draw the run's timeline as a PNG here")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_engine_args(p)
    p.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> None:
    """`python -m loom.agent.cli run ...`: the same command without the rest of the `loom` CLI."""
    parser = argparse.ArgumentParser(prog="loom")
    parser.add_argument("--log-level", default="INFO")
    add_run_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args.func(args)


if __name__ == "__main__":
    main()
