"""Two OpenAI-compatible servers under the same load in one run: `loom bench llama-server compare`.

Both servers are started on loopback (and stopped at the end whatever happens), checked for the same
greedy tokens on a few prompts, warmed up, then given the same workload in alternating rounds: round r
sends the same requests (workload seed `seed + r`) to each server, in the order A B, B A, A B, ... so a
slow drift of the machine's load hits both alike, and no server ever sees a prompt twice (neither a
prefix cache nor a prompt cache can answer from an earlier round). Each round is `loom bench serve`'s load
generator (loom/bench/serve.py) on the completions endpoint with token-id prompts, greedy, ignore_eos,
so every request decodes exactly its output length on both servers.

Per server it reports the median over its rounds of output tok/s, TTFT p50 and TPOT p50, and the ratio
of the first server to the second; with the CPU time other processes used during each round (the
load generator runs in this process, on the same cores as the servers, and is not counted as other load).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from loom.bench import compare_report, throughput
from loom.bench.compare_report import summarize
from loom.bench.metrics import compute_metrics
from loom.bench.serve import BenchError, ServeConfig, run_load
from loom.bench.workloads import Request, Workload
from loom.errors import InvalidRequest

logger = logging.getLogger(__name__)

KINDS = ("loom", "llama.cpp")
WARMUP_SEED_OFFSET = 10_000  # warm-up and agreement prompts never coincide with a round's
AGREEMENT_SEED_OFFSET = 20_000


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


# ---- workload, agreement ------------------------------------------------------------------------------


def make_round_workload(spec: str, n: int, vocab: int, seed: int, max_len: int) -> Workload:
    """`loom bench throughput`'s token-id workload (the same 48 requests as its figures with seed 0) as
    requests for the load generator."""
    reqs = throughput.make_workload(spec, n, vocab, seed, max_len)
    return Workload(spec, [Request(prompt=r.prompt, max_tokens=r.output_len) for r in reqs])


def _agree(a: list[str], b: list[str]) -> float:
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return n / max(len(a), len(b), 1)


async def greedy_tokens(
    client: httpx.AsyncClient, peer: Peer, prompt: list[int], max_tokens: int, decode: Callable[[int], str]
) -> list[str]:
    """The text of each greedy output token (EOS stops it: llama.cpp's ignore_eos bans EOS rather than
    ignoring it, so the comparison runs without). loom's completions logprobs carry each token's text;
    llama-server's own /completion returns token ids, decoded one by one with the checkpoint's tokenizer,
    as loom decodes them."""
    if peer.kind == "loom":
        body = {"model": peer.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        resp = await client.post(peer.url + "/v1/completions", json=body | {"logprobs": 1, "cache": False})
        resp.raise_for_status()
        return list(resp.json()["choices"][0]["logprobs"]["tokens"])
    body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "top_k": 1}
    resp = await client.post(
        peer.url + "/completion", json=body | {"return_tokens": True, "cache_prompt": False}
    )
    resp.raise_for_status()
    return [decode(t) for t in resp.json()["tokens"]]


async def check_agreement(
    peers: list[Peer], prompts: list[list[int]], max_tokens: int, decode: Callable[[int], str]
) -> dict:
    """Greedy outputs of the first peer against the second's, prompt by prompt."""
    async with httpx.AsyncClient(timeout=600) as client:
        outs = [[await greedy_tokens(client, p, q, max_tokens, decode) for q in prompts] for p in peers]
    fractions = [_agree(a, b) for a, b in zip(outs[0], outs[1], strict=True)]
    return {
        "prompts": len(prompts),
        "tokens": max_tokens,
        "token_agreement": sum(fractions) / max(len(fractions), 1),
        "identical": sum(a == b for a, b in zip(outs[0], outs[1], strict=True)),
        "how": "greedy, no ignore_eos; per-token text (loom: completions logprobs; llama.cpp: /completion "
        "return_tokens decoded with the checkpoint's tokenizer)",
    }


# ---- the run -------------------------------------------------------------------------------------------


@dataclass
class CompareSettings:
    """What one comparison sends: the same for every server."""

    workload: str = "random"
    num_requests: int = 48
    rounds: int = 3
    concurrency: int = 16
    seed: int = 0
    warmup: int | None = None
    """Warm-up requests per server (None: as many as the concurrency, so every slot is used once)."""
    agreement_prompts: int = 4
    agreement_tokens: int = 32
    timeout: float = 600.0

    def __post_init__(self) -> None:
        for name in ("num_requests", "rounds", "concurrency"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be >= 1, got {getattr(self, name)}", param=name)
        if self.workload not in throughput.WORKLOADS:
            raise InvalidRequest(
                f"workload must be one of {throughput.WORKLOADS}, got {self.workload!r}", param="workload"
            )
        if self.agreement_prompts < 0 or self.agreement_tokens < 1:
            raise InvalidRequest("agreement needs >= 0 prompts of >= 1 token", param="agreement_prompts")

    @property
    def warmup_requests(self) -> int:
        return self.concurrency if self.warmup is None else self.warmup


@dataclass
class Plan:
    """Every request a comparison sends, made before any server starts."""

    rounds: list[Workload]
    """Round r's workload (seed + r), the same for both servers."""
    warmup: Workload | None
    prompts: list[list[int]]
    """The greedy-agreement prompts."""
    agreement_tokens: int

    @property
    def longest(self) -> int:
        """Prompt + output tokens of the longest request: the context each server slot needs."""
        reqs = [it for w in self.rounds + ([self.warmup] if self.warmup else []) for it in w.items]
        return max(
            [len(r.prompt) + r.max_tokens for r in reqs]
            + [len(q) + self.agreement_tokens for q in self.prompts]
        )


def plan_workloads(s: CompareSettings, vocab: int, max_len: int) -> Plan:
    rounds = [
        make_round_workload(s.workload, s.num_requests, vocab, s.seed + r, max_len) for r in range(s.rounds)
    ]
    warm = None
    if s.warmup_requests:
        warm = make_round_workload(s.workload, s.warmup_requests, vocab, s.seed + WARMUP_SEED_OFFSET, max_len)
    agreement = make_round_workload(
        "random", max(s.agreement_prompts, 1), vocab, s.seed + AGREEMENT_SEED_OFFSET, max_len
    )
    prompts = [it.prompt for it in agreement.items][: s.agreement_prompts]
    return Plan(rounds, warm, prompts, s.agreement_tokens)


def round_order(peers: list, rounds: int) -> list[tuple[int, int]]:
    """(round, peer index) in the order run: A B, B A, A B, ..."""
    return [(r, i if r % 2 == 0 else len(peers) - 1 - i) for r in range(rounds) for i in range(len(peers))]


def _cpu_busy() -> float:
    t = psutil.cpu_times()
    return t.user + t.system + t.nice


def _own_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def measure_round(
    server: RunningServer, idle: RunningServer, workload: Workload, seed: int, round_: int, s: CompareSettings
) -> dict:
    config = ServeConfig(
        base_url=server.peer.url,
        model=server.peer.model,
        endpoint="completions",
        max_concurrency=s.concurrency,
        seed=seed,
        temperature=0.0,
        ignore_eos=True,
        extra_body=dict(server.peer.extra_body),
        timeout=s.timeout,
        progress=False,
    )
    before = (_cpu_busy(), _own_cpu(), server.cpu_seconds(), idle.cpu_seconds(), time.perf_counter())
    run = asyncio.run(run_load(config, workload))
    after = (_cpu_busy(), _own_cpu(), server.cpu_seconds(), idle.cpu_seconds(), time.perf_counter())
    busy, own, srv, idl, wall = (b - a for a, b in zip(before, after, strict=True))
    m = compute_metrics(run.records, run.duration)
    exact = sum(r.success and r.output_tokens == r.request.max_tokens for r in run.records)
    return {
        "round": round_,
        "peer": server.peer.name,
        "seed": seed,
        "completed": exact,
        "failed": len(run.records) - exact,
        "duration_s": run.duration,
        "output_tokens": m.total_output_tokens,
        "output_tok_s": m.output_throughput,
        "ttft_p50_ms": m.ttft.median,
        "tpot_p50_ms": m.tpot.median,
        "other_load_cores": max(0.0, (busy - own - srv - idl) / wall),
        "idle_peer_cores": idl / wall,
    }


def run_compare(
    peers: list[Peer],
    settings: CompareSettings,
    vocab: int,
    max_len: int,
    decode: Callable[[int], str],
    command: str = "",
    info: Callable[[Peer], dict] | None = None,
) -> dict:
    """Start both peers, check agreement, warm up, run the alternating rounds; the result (COMPARE_SCHEMA)."""
    if len(peers) != 2 or peers[0].name == peers[1].name:
        raise InvalidRequest("a comparison takes two peers with different names")
    s = settings
    load_before = list(os.getloadavg())
    plan = plan_workloads(s, vocab, max_len)
    workloads, warm, prompts = plan.rounds, plan.warmup, plan.prompts
    with ExitStack() as stack:
        servers = [stack.enter_context(running(p, s.timeout)) for p in peers]
        agreement = (
            asyncio.run(check_agreement(peers, prompts, s.agreement_tokens, decode)) if prompts else {}
        )
        if warm is not None:
            for sv, other in zip(servers, servers[::-1], strict=True):
                measure_round(sv, other, warm, s.seed + WARMUP_SEED_OFFSET, -1, s)
        rounds = []
        for r, i in round_order(peers, s.rounds):
            rounds.append(measure_round(servers[i], servers[1 - i], workloads[r], s.seed + r, r, s))
            logger.info(
                "round %d %s: %.1f out tok/s, other load %.2f cores",
                r, peers[i].name, rounds[-1]["output_tok_s"], rounds[-1]["other_load_cores"],
            )  # fmt: skip
        peer_info = [
            {"name": p.name, "kind": p.kind, "command": p.argv, "log": str(p.log) if p.log else None}
            | (info(p) if info else {})
            for p in peers
        ]
    first = workloads[0].items
    return {
        "schema_version": compare_report.SCHEMA_VERSION,
        "benchmark": "compare",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()),
            "isa": cpu_isa(),
        },
        "settings": {
            "workload": s.workload,
            "num_requests": s.num_requests,
            "rounds": s.rounds,
            "concurrency": s.concurrency,
            "seed": s.seed,
            "warmup": s.warmup_requests,
            "prompt_tokens": sum(len(it.prompt) for it in first),
            "output_tokens": sum(it.max_tokens for it in first),
            "agreement_prompts": s.agreement_prompts,
            "agreement_tokens": s.agreement_tokens,
        },
        "peers": peer_info,
        "agreement": agreement,
        "rounds": rounds,
        "summary": summarize([p.name for p in peers], rounds),
    }


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
