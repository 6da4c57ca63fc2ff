"""`loom serve` on first contact: a model given as a positional argument, and a model that cannot be
served (no such directory, a Hugging Face hub id, a directory that fails to load) ends the process at
once with the reason and a non-zero status, instead of a server answering 503 forever."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[3]
EXIT_BAD_MODEL = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "loom", "--log-level", "WARNING", "serve", "--port", str(free_port())]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _refused(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """Run `loom serve` in-process where it must refuse before starting anything: its exit status and
    stderr. (A subprocess would spend seconds importing torch to print one line.)"""
    import loom.entrypoints.server.app as server_app
    from loom.entrypoints.cli import main

    def started(*_, **__):
        raise AssertionError("a server was started")

    monkeypatch.setattr(server_app, "create_app", started)
    with pytest.raises(SystemExit) as exit_:
        main(["serve", *args])
    return exit_.value.code, capsys.readouterr().err


def test_a_missing_model_directory_exits_with_the_reason(tmp_path, capsys, monkeypatch):
    code, err = _refused(capsys, monkeypatch, str(tmp_path / "nope"))
    assert code == EXIT_BAD_MODEL
    assert f"model directory {tmp_path / 'nope'} does not exist" in err


def test_a_hub_id_is_named_as_such(capsys, monkeypatch):
    code, err = _refused(capsys, monkeypatch, "--model", "zai-org/GLM-4.1V-9B-Thinking")
    assert code == EXIT_BAD_MODEL
    assert "looks like a Hugging Face hub id" in err and "never downloads" in err


def test_a_directory_that_fails_to_load_ends_the_server(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"]}')
    out = _serve(str(tmp_path), "--num-threads", "1")
    assert out.returncode == EXIT_BAD_MODEL
    assert "the model failed to load" in out.stderr


def test_the_model_as_a_positional_argument(tiny_llama_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "loom", "--log-level", "WARNING", "serve", str(tiny_llama_dir)]
    cmd += ["--port", str(port), "--num-threads", "1", "--num-blocks", "64"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                if models["data"][0]["max_model_len"]:
                    break
            except (httpx.TransportError, KeyError):
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
        assert models["data"][0]["id"] == str(tiny_llama_dir)  # the served name defaults to the path
    finally:
        proc.terminate()
        proc.wait(30)
