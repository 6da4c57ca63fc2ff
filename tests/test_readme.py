"""The README against the code: its configuration tables are the generated ones, every `loom` command it
shows parses with the real CLI and names files that exist, and its Python snippets and commands run
(against a real `loom serve` of the tiny model, with the README's own host swapped for the test server's).
The heavier README commands run in their own tests: the agent examples in
tests/agent/test_agent_examples.py, the bench command in tests/bench/test_bench_serve.py."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from loom.config_docs import rewrite
from loom.entrypoints.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def _commands() -> list[list[str]]:
    """Each `loom ...` command of the bash blocks, comments dropped, continuation lines joined."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("loom "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_configuration_tables_are_the_generated_ones():
    assert rewrite(README) == README, "run: python -m loom.config_docs README.md"


def test_every_loom_command_parses_and_its_files_exist():
    commands = _commands()
    assert {"serve", "run", "bench"} <= {c[0] for c in commands}
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)
        if argv[0] == "run":
            assert (REPO / args.workflow).is_file(), argv
            for item in args.input or []:
                _, _, value = item.partition("=")
                if value.startswith("@"):
                    assert (REPO / value[1:]).is_file(), argv
            if args.sandbox:
                assert (REPO / args.sandbox).is_dir(), argv


def test_the_readme_says_where_loom_is_installed():
    assert ".venv/bin" in README and "python -m loom" in README


def test_python_m_loom_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "loom", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "serve" in out.stdout and "run" in out.stdout


@pytest.fixture(scope="module")
def readme_server(launch_server):
    return launch_server("readme", api_key="sk-local").wait_ready()


def _snippet(marker: str) -> str:
    return next(block for block in _blocks("python") if marker in block)


def test_python_snippets_run_against_a_server(readme_server):
    url = readme_server.url
    for marker in ("for chunk in client.chat", "class City(BaseModel)"):
        code = _snippet(marker).replace("http://127.0.0.1:8000", url)
        code = code.replace('"loom-tiny"', repr(readme_server.model))
        namespace: dict = {}
        exec(compile(code, f"README:{marker}", "exec"), namespace)  # noqa: S102 - the README's own code


def test_curl_commands_run_against_a_server(readme_server):
    block = next(b for b in _blocks("bash") if "curl" in b)
    curls = [c for c in block.replace("\\\n", " ").splitlines() if c.strip().startswith("curl")]
    assert len(curls) == 2
    for line in curls:
        line = line.split("  #")[0].replace("localhost:8000", f"127.0.0.1:{readme_server.port}")
        line = line.replace('"model": "loom-tiny"', f'"model": "{readme_server.model}"')
        out = subprocess.run(
            shlex.split(line) + ["--fail", "--max-time", "60"], capture_output=True, text=True
        )
        assert out.returncode == 0, (line, out.stderr)
