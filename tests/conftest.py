"""Shared fixtures: built-in tiny random-weight models, made once per test session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from loom.models.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Returns make(arch="llama") -> directory of that arch's tiny model, made on first request."""
    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            made[arch] = make_tiny(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, size="tiny", seed=0)
        return made[arch]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    """The tiny llama model directory (tied embeddings)."""
    return tiny_model_dir("llama")


# ---- live `loom serve` processes on loopback (server and agent tests) -----------------------------

REPO = Path(__file__).resolve().parents[1]
MODEL = "loom-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    api_key: str | None
    model: str = MODEL

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60, **kwargs)

    def openai(self) -> openai.OpenAI:
        # No retries: 429 and 503 must reach the test, not be retried away.
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, timeout=60
        )

    def async_openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, timeout=60
        )

    def wait_ready(self, timeout: float = 180.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/ready", headers=self.headers, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    def metric(self, name: str, labels: str = "") -> float:
        """One sample from /metrics, e.g. metric("loom_requests_total", 'finish_reason="stop"'); 0 if absent."""
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


LOOM_CLI = ("-m", "loom.entrypoints.cli")


def launch(
    model_dir: Path,
    log_dir: Path,
    name: str,
    *args: str,
    api_key: str | None = None,
    entry: tuple[str, ...] = LOOM_CLI,
) -> Server:
    """`entry`: what python runs, the `loom` CLI by default (a test's own wrapper of it otherwise)."""
    port = free_port()
    cmd = [sys.executable, *entry, "--log-level", "WARNING", "serve"]
    cmd += [
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--num-blocks",
        "512",
        "--served-model-name",
        MODEL,
    ]
    # One intra-op thread: on a shared 2-core box, torch's spinning worker threads slow steps ~50x.
    cmd += ["--num-threads", "1"]
    if api_key:
        cmd += ["--api-key", api_key]
    cmd += list(args)
    log = log_dir / f"{name}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    return Server(proc, port, log, api_key)


@pytest.fixture(scope="session")
def launch_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """launch_server(name, *flags, api_key=None, entry=LOOM_CLI) -> a Server of the tiny model (not yet
    ready), stopped at the end of the session: for test modules that need a server of their own
    configuration."""
    logs = tmp_path_factory.mktemp("more-server-logs")
    started: list[Server] = []

    def start(
        name: str,
        *args: str,
        api_key: str | None = None,
        entry: tuple[str, ...] = LOOM_CLI,
        model_dir: Path | None = None,
    ) -> Server:
        model = tiny_llama_dir if model_dir is None else model_dir
        started.append(launch(model, logs, name, *args, api_key=api_key, entry=entry))
        return started[-1]

    yield start
    for server in started:
        server.stop()
