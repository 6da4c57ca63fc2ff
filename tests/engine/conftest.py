"""Factories for engine unit tests: a Scheduler with its KV manager, a Request, and a model-free runner
so tests drive the real step loop (schedule -> runner -> update_from_output) through the typed boundary."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from weakref import WeakKeyDictionary

import pytest
import torch

from loom.config import EngineConfig
from loom.engine.request import Request
from loom.engine.runner_state import RequestStates
from loom.engine.scheduler import Scheduler
from loom.engine.step import ModelRunnerOutput, SchedulerOutput
from loom.engine.structured import GrammarCompiler
from loom.kv.manager import KVCacheManager
from loom.sampling_params import SamplingParams
from loom.tokenizer import Tokenizer

BS = 4


def make_scheduler(
    num_blocks: int = 64,
    budget: int = 2048,
    max_num_seqs: int = 128,
    chunked: bool = True,
    caching: bool = True,
    policy: str = "fcfs",
    max_model_len: int | None = None,
    **config,
) -> Scheduler:
    cfg = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        block_size=BS,
        num_blocks=num_blocks,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=caching,
        scheduling_policy=policy,
        **config,
    )
    kv = KVCacheManager(num_blocks, BS, caching)
    return Scheduler(cfg, kv, max_model_len if max_model_len is not None else num_blocks * BS)


def make_req(
    request_id: str,
    prompt,
    max_tokens: int = 16,
    priority: int = 0,
    arrival: float | None = None,
    program: str | None = None,
) -> Request:
    extra = {"program_id": program} if program else {}
    params = SamplingParams(max_tokens=max_tokens, priority=priority, extra=extra)
    return Request(request_id, list(prompt), params, max_tokens, arrival_time=arrival)


class FakeRunner:
    """The runner without a model: keeps its RequestStates from each SchedulerOutput exactly as the real
    runner does, and samples token 900 + (the sequence's output index) where a step reaches the end."""

    def __init__(self) -> None:
        self.states = RequestStates()

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.states.update(sched)
        out = ModelRunnerOutput()
        for req_id, n in sched.num_scheduled_tokens.items():
            state = self.states[req_id]
            draft = sched.spec_token_ids.get(req_id, [])
            sampled = []
            if state.samples(n, len(draft)):
                # Drafts are accepted while they are what this runner would sample, then one more token.
                for d in [*draft, None]:
                    sampled.append(900 + state.num_output_tokens + len(sampled))
                    if d != sampled[-1]:
                        break
                out.req_ids.append(req_id)
                out.sampled_token_ids.append(sampled)
                out.logprobs.append(None)
            self.states.advance(req_id, n, sampled, len(draft))
        return out


@dataclass
class Step:
    out: SchedulerOutput
    result: ModelRunnerOutput

    @property
    def plan(self) -> list[tuple[str, int]]:
        return list(self.out.num_scheduled_tokens.items())

    @property
    def sampled(self) -> list[bool]:
        """Per scheduled request, in plan order: whether the step sampled a token for it."""
        return [rid in self.result.req_ids for rid in self.out.num_scheduled_tokens]

    @property
    def preempted(self) -> list[str]:
        return self.out.preempted_req_ids


_RUNNERS: WeakKeyDictionary[Scheduler, FakeRunner] = WeakKeyDictionary()


def runner_of(sched: Scheduler) -> FakeRunner:
    return _RUNNERS.setdefault(sched, FakeRunner())


def run_step(sched: Scheduler) -> Step:
    """One engine step through the typed boundary: schedule, the fake runner, update_from_output."""
    out = sched.schedule()
    result = runner_of(sched).execute(out)
    sched.update_from_output(out, result)
    return Step(out, result)


def step(sched: Scheduler) -> list[tuple[str, int]]:
    return run_step(sched).plan


# ---- structured output (tests/engine/structured): the tiny tokenizer and one compiler per session ------
# Here rather than in a conftest of that directory: the engine tests import this file's helpers as
# `conftest`, and a second conftest.py below would take that name when its directory is collected first.


@pytest.fixture(scope="session")
def tokenizer(tiny_llama_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_llama_dir)


@pytest.fixture(scope="session")
def compiler(tokenizer: Tokenizer) -> Iterator[GrammarCompiler]:
    compiler = GrammarCompiler(tokenizer)
    yield compiler
    compiler.close()


@pytest.fixture(scope="session")
def closers(tokenizer: Tokenizer, compiler: GrammarCompiler) -> torch.Tensor:
    from grammar_walk import closing_tokens  # tests/engine/structured is on sys.path once its tests load

    return closing_tokens(tokenizer, compiler.vocab_size)
