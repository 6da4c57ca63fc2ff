"""Real `loom serve` processes on loopback for the server tests, started once and in parallel."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[3]
API_KEY = "sk-loom-test"
MODEL = "loom-test"
MAX_BODY_BYTES = 65536


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


def launch(model_dir: Path, log_dir: Path, name: str, *args: str, api_key: str | None = None) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "loom.entrypoints.cli", "--log-level", "WARNING", "serve"]
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
def servers(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """All server processes the tests use, launched together so their model loads overlap."""
    logs = tmp_path_factory.mktemp("server-logs")
    started = {
        "main": launch(
            tiny_llama_dir, logs, "main", "--max-body-bytes", str(MAX_BODY_BYTES), api_key=API_KEY
        ),
        "limited": launch(
            tiny_llama_dir, logs, "limited", "--max-waiting", "2", "--max-waiting-tokens", "200"
        ),
        "drain": launch(tiny_llama_dir, logs, "drain", "--drain-timeout", "60"),
    }
    yield started
    for server in started.values():  # signal all first, so their shutdowns overlap
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGINT)
    for server in started.values():
        server.stop()


@pytest.fixture(scope="session")
def server(servers: dict[str, Server]) -> Server:
    """The main server: API key required, 64 KiB body limit, default backpressure limits."""
    return servers["main"].wait_ready()


@pytest.fixture(scope="session")
def limited_server(servers: dict[str, Server]) -> Server:
    """No API key; at most 2 requests / 200 prompt tokens in flight."""
    return servers["limited"].wait_ready()


@pytest.fixture(scope="session")
def launch_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """launch_server(name, *flags, api_key=None) -> a Server of the tiny model (not yet ready), stopped at
    the end of the session: for test modules that need a server of their own configuration."""
    logs = tmp_path_factory.mktemp("more-server-logs")
    started: list[Server] = []

    def start(name: str, *args: str, api_key: str | None = None) -> Server:
        started.append(launch(tiny_llama_dir, logs, name, *args, api_key=api_key))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def drain_server(servers: dict[str, Server]) -> Server:
    """A server the test may SIGTERM (it is not usable afterwards)."""
    return servers["drain"].wait_ready()


def _wait_for(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture
def wait_for():
    """wait_for(predicate, timeout=30) -> whether it became true in time."""
    return _wait_for
