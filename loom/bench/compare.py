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
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import httpx

from loom.bench import compare_report, throughput
from loom.bench.compare_report import summarize
from loom.bench.metrics import compute_metrics
from loom.bench.peers import Peer, RunningServer, cpu_isa, running
from loom.bench.serve import ServeConfig, run_load
from loom.bench.throughput import ForeignLoad
from loom.bench.workloads import Request, Workload
from loom.errors import InvalidRequest

logger = logging.getLogger(__name__)
WARMUP_SEED_OFFSET = 10_000  # warm-up and agreement prompts never coincide with a round's
AGREEMENT_SEED_OFFSET = 20_000


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
    idle_before = idle.cpu_seconds()
    # Foreign: neither this process (the load generator) nor either server.
    with ForeignLoad(ours=lambda: server.cpu_seconds() + idle.cpu_seconds()) as load:
        run = asyncio.run(run_load(config, workload))
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
        "other_load_cores": load.cores,
        "idle_peer_cores": (idle.cpu_seconds() - idle_before) / load.seconds,
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
