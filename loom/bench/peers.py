"""The servers a comparison starts (`loom bench llama-server compare`): what to run (`Peer`), the running
process group with its CPU-time accounting (`RunningServer`), and `loom serve` as a peer. llama-server's
command line is in llama_server.py."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from loom.bench.serve import BenchError
from loom.errors import InvalidRequest

logger = logging.getLogger(__name__)

KINDS = ("loom", "llama.cpp")


@dataclass
class Peer:
    """One server to start and measure."""

    name: str
    kind: str
    """loom or llama.cpp: how readiness and greedy tokens are read from it."""
    argv: list[str]
    port: int
    model: str
    """The model name requests send (loom's --served-model-name, llama-server's --alias)."""
    extra_body: dict = field(default_factory=dict)
    """Merged into every timed request (llama.cpp: cache_prompt false)."""
    log: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequest(f"peer kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ready_path(self) -> str:
        return "/ready" if self.kind == "loom" else "/health"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A started peer: its process group (so workers it forks go with it) and CPU-time accounting."""

    def __init__(self, peer: Peer, proc: subprocess.Popen):
        self.peer, self.proc = peer, proc
        self.ps = psutil.Process(proc.pid)

    def cpu_seconds(self) -> float:
        """CPU time of the server and every process it started, so far."""
        total = 0.0
        for p in [self.ps, *self.ps.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.peer.name} exited with {self.proc.returncode} while starting; {self._tail()}"
                )
            try:
                if httpx.get(self.peer.url + self.peer.ready_path, timeout=2).status_code == 200:
                    return
                # loom opens its port before the model loads; /health turns 503 if loading failed.
                if (
                    self.peer.kind == "loom"
                    and httpx.get(self.peer.url + "/health", timeout=2).status_code == 503
                ):
                    raise BenchError(f"{self.peer.name} failed to load its model; {self._tail()}")
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise BenchError(f"{self.peer.name} not ready after {timeout:.0f} s; {self._tail()}")

    def _tail(self) -> str:
        if self.peer.log is None or not self.peer.log.exists():
            return "no log"
        lines = self.peer.log.read_text(errors="replace").strip().splitlines()[-10:]
        return f"the end of {self.peer.log}:\n" + "\n".join(lines)

    def stop(self) -> None:
        """SIGINT (both servers shut down cleanly on it), then SIGKILL to the whole group after 15 s."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        # Workers that outlived their parent (same group) go too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@contextmanager
def running(peer: Peer, timeout: float) -> Iterator[RunningServer]:
    """Start `peer`, wait until it is ready, and stop it on the way out, whatever happened."""
    logger.info("starting %s: %s", peer.name, " ".join(peer.argv))
    out = peer.log.open("w") if peer.log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            peer.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    finally:
        if peer.log:
            out.close()
    server = RunningServer(peer, proc)
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()


def cpu_isa() -> str:
    """The SIMD flags that decide llama.cpp's (and oneDNN's) kernels, from /proc/cpuinfo."""
    try:
        flags = next(
            line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").open() if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return ""
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16")
    return " ".join(f for f in wanted if f in flags)


def loom_peer(
    name: str,
    model_dir: Path,
    dtype: str,
    threads: int,
    port: int,
    served_name: str,
    extra: list[str] | tuple[str, ...] = (),
    log: Path | None = None,
) -> Peer:
    """`loom serve` as a peer: the given dtype and torch threads; `extra` (e.g. --quantization int8) last."""
    argv = [sys.executable, "-m", "loom.entrypoints.cli", "--log-level", "WARNING", "serve"]
    argv += ["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype]
    argv += ["--num-threads", str(threads), "--served-model-name", served_name, *extra]
    return Peer(name, "loom", argv, port, served_name, log=log)
