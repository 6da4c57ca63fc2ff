"""A request that makes an engine step fail fails alone: the engine finds it by bisection and the requests
batched with it finish with exactly the tokens they produce alone, seeded ones included (the runner is
all-or-nothing: a failed step moves no state and restores generators). The faults are hooks installed
by these tests around the real model and sampler, never code in loom."""

from __future__ import annotations

import random

import pytest

from loom import LLM, SamplingParams
from loom.engine.request import RequestStatus
from loom.errors import RequestFailed
from loom.layers.sampler import Sampler
from loom.models.llama import LlamaForCausalLM

POISON = 2001


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", num_blocks=128)


def _prompts(n: int, length: int = 12, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1900) for _ in range(length + k)] for k in range(n)]


def _run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict[int, list[int] | str]:
    """Drive the engine directly: index -> tokens, or the error a failed request got."""
    requests = [
        llm.input.process(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
    ]
    for r in requests:
        llm.output.add_request(r)
        for seq in r.seqs:
            llm.engine.add_request(seq)
    results: dict[int, list[int] | str] = {i: [] for i in range(len(requests))}
    while llm.engine.has_unfinished():
        processed = llm.output.process_outputs(llm.engine.step())
        for rid, why in processed.failed.items():
            results[int(rid[1:])] = why
        for out in processed.request_outputs:
            results[int(out.request_id[1:])] += out.outputs[0].token_ids
    assert not llm.output.has_unfinished()
    return results


@pytest.fixture
def poisoned_forward(monkeypatch):
    forward = LlamaForCausalLM.forward

    def faulty(self, input_ids, *args, **kwargs):
        if (input_ids == POISON).any():
            raise RuntimeError("injected: a poisoned token in the batch")
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", faulty)


def test_poisoned_request_fails_alone_and_the_others_match_their_solo_runs(llm, poisoned_forward):
    prompts = _prompts(6)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    params = [greedy, seeded] * 3
    alone = [_run(llm, [p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    mixed = _run(llm, prompts[:3] + [[5, POISON, 6]] + prompts[3:], params[:3] + [greedy] + params[3:])
    assert "injected" in mixed[3]
    assert [mixed[i] for i in (0, 1, 2, 4, 5, 6)] == alone
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.pool.num_blocks, "the failed request's blocks are all freed"
    llm.engine.step()
    assert not llm.engine.runner.states.states


def test_a_request_reading_the_culprits_unwritten_blocks_is_recomputed(llm, poisoned_forward):
    """B shares A's 32-token prefix and is admitted in the step that computes it: B's prefix hit is on
    blocks only A's forward would write. When A fails, B must not read them: it is recomputed."""
    llm.reset_prefix_cache()
    shared = _prompts(1, length=32, seed=9)[0]
    b = shared + [7, 8, 9]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = _run(llm, [b], [greedy])[0]
    llm.reset_prefix_cache()
    before = llm.engine.stats.num_preemptions
    out = _run(llm, [shared + [POISON], b], [greedy, greedy])
    assert isinstance(out[0], str) and out[1] == alone
    assert llm.engine.stats.num_preemptions == before + 1  # B was rewound, not fed A's unwritten KV


def test_failure_in_the_sampler_restores_seeded_generators(llm, monkeypatch):
    sample = Sampler._sample

    def faulty(self, logits, meta):
        tokens = sample(self, logits, meta)  # draws every seeded row's noise, then fails
        if any(POISON in p for p in meta.prompt_token_ids):
            raise RuntimeError("injected: the sampler failed")
        return tokens

    monkeypatch.setattr(Sampler, "_sample", faulty)
    prompts = _prompts(3, seed=5)
    seeded = [SamplingParams(temperature=1.0, seed=s, max_tokens=6, ignore_eos=True) for s in (1, 2, 3)]
    alone = [_run(llm, [p], [sp])[0] for p, sp in zip(prompts, seeded, strict=True)]
    mixed = _run(llm, [prompts[0], [9, POISON], prompts[1], prompts[2]], [seeded[0], seeded[0], *seeded[1:]])
    assert isinstance(mixed[1], str)
    assert [mixed[0], mixed[2], mixed[3]] == alone


def test_llm_generate_raises_request_failed(llm, poisoned_forward):
    with pytest.raises(RequestFailed, match="injected"):
        llm.generate([[5, POISON]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished()
    assert RequestStatus.FINISHED_ERROR.finished
