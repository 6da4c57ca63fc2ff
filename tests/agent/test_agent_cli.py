"""`loom run`'s output: strict JSON whatever the nodes returned, and the run record always written."""

from __future__ import annotations

import argparse
import asyncio
import json
import math

import pytest

from loom.agent.cli import add_run_parser, render_summary
from loom.agent.graph import Workflow
from loom.agent.runtime import Runtime


def _strict_loads(text: str):
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)  # NaN / Infinity are refused


def test_summary_is_strict_json_whatever_the_outputs_hold():
    wf = Workflow()
    wf.python("huge", lambda: 10**5000)  # past Python's int-to-str limit
    wf.python("infinite", lambda: [math.inf, 1.0])
    wf.python("fine", lambda: {"n": 3})
    result = asyncio.run(Runtime().run(wf))
    assert result.ok
    printed = _strict_loads(render_summary(result))
    assert printed["outputs"]["fine"] == {"n": 3}
    for name in ("huge", "infinite"):
        assert printed["outputs"][name].startswith("<not representable as JSON"), printed["outputs"][name]


def _run_cli(tmp_path, workflow: str, *extra: str) -> argparse.Namespace:
    path = tmp_path / "wf.yaml"
    path.write_text(workflow)
    parser = argparse.ArgumentParser(prog="loom")
    add_run_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["run", str(path), "-q", *extra])  # tools only: no model is loaded


def test_a_calculator_overflow_fails_its_node_and_the_record_is_written(tmp_path, capsys):
    """`loom run` used to die printing 9**23000 (int-to-str limit) and print 1e308*10 as Infinity."""
    record = tmp_path / "run.json"
    args = _run_cli(
        tmp_path,
        """
name: overflow
nodes:
  - {name: huge, kind: tool, tool: calculator, args: {expression: "9 ** 23000"}}
  - {name: inf, kind: tool, tool: calculator, args: {expression: "1e308 * 10"}}
  - {name: ok, kind: tool, tool: calculator, args: {expression: "2 ** 64"}}
""",
        "--policy",
        "continue",
        "--record",
        str(record),
    )
    with pytest.raises(SystemExit) as exit_:
        args.func(args)
    assert exit_.value.code == 1  # the run failed: some nodes did
    printed = _strict_loads(capsys.readouterr().out)
    assert printed["status"] == "failed" and printed["outputs"] == {"ok": 2**64}
    assert "4000 digits" in printed["errors"]["huge"] and "overflows" in printed["errors"]["inf"]
    saved = json.loads(record.read_text())
    assert {n: saved["nodes"][n]["status"] for n in ("huge", "inf", "ok")} == {
        "huge": "failed",
        "inf": "failed",
        "ok": "ok",
    }
