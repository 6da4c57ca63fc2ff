"""benchmarks/agent_dag.py end to end at toy size on the tiny model: it runs and its table adds up."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "agent_dag.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("agent_dag_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def row(text: str, name: str) -> list[str]:
    match = re.search(rf"^\| {re.escape(name)} \|(.*)\|$", text, re.M)
    assert match, f"no row {name!r} in:\n{text}"
    return [cell.strip() for cell in match.group(1).split("|")]


def test_agent_dag_bench_small_run(tiny_llama_dir: Path, capsys):
    argv = ["--small", "--model", str(tiny_llama_dir), "--dtype", "float32", "--threads", "1"]
    load_bench().main(argv)
    out = capsys.readouterr().out
    sent_seq, sent_par, _ = row(out, "prompt tokens sent")
    cached_seq, cached_par, _ = row(out, "prompt tokens from cache")
    computed_seq, computed_par, _ = row(out, "prompt tokens computed")
    # Caching off computes every prompt token; on, the branches share the document's blocks.
    assert int(cached_seq) == 0 and int(computed_seq) == int(sent_seq)
    assert int(cached_par) > 0 and int(computed_par) < int(computed_seq)
    assert int(computed_par) + int(cached_par) == int(sent_par)
    for name in ("short programs, seconds", "long programs, engine steps", "makespan, seconds"):
        fcfs, program, _ = row(out, name)
        assert float(fcfs) > 0 and float(program) > 0
    assert "command: python benchmarks/agent_dag.py --small" in out
