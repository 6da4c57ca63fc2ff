"""`loom serve --replicas 1` as a user runs it: serves, then exits 0 on SIGTERM and leaves no Ray
process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loom_serve_replicas_serves_and_shuts_ray_down_on_sigterm(tiny_llama_dir, tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    cmd = [sys.executable, "-m", "loom.entrypoints.cli", "--log-level", "WARNING", "serve", "--replicas", "1"]
    cmd += ["--model", str(tiny_llama_dir), "--num-threads", "1", "--num-blocks", "128", "--port", str(port)]
    cmd += ["--served-model-name", "m", "--replica-num-cpus", "0.5"]
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO))
    )
    try:
        deadline = time.monotonic() + 240
        answer = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/v1/completions",
                    json={"model": "m", "prompt": "hello", "max_tokens": 3},
                    timeout=30,
                )
                if answer.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        assert answer is not None and answer.status_code == 200, (tmp_path / "serve.log").read_text()[-3000:]
        assert answer.headers["x-loom-model-version"] == "stable"
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in ray_processes)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        gone, alive = psutil.wait_procs(ray_processes, timeout=60)
        assert not alive, [p.cmdline()[:1] for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
