"""Speculative decoding: proposers (n-gram lookup, suffix automaton), the adaptive controller, the
scheduler and runner verifying drafts in one forward (greedy output token-identical, rejected drafts'
KV rolled back), and rejection sampling that keeps the target distribution.

Random-weight models never copy their context, so the end-to-end tests drive the engine with an oracle
proposer installed by the test: it proposes the true continuation (from a run without speculation)
with some tokens corrupted, so both acceptance and rejection happen in every path."""

from __future__ import annotations

import random

import pytest
import torch
from step_loop import make_req, make_scheduler, run_step

from loom import LLM, SamplingParams
from loom.engine.spec_decode import SpeculativeConfig
from loom.engine.spec_decode.proposer import NgramIndex, Proposer
from loom.engine.spec_decode.suffix import SuffixAutomaton
from loom.errors import InvalidRequest
from loom.layers.rejection_sampler import verify
from loom.layers.sampler import Sampler, SamplingMetadata

# ---- proposers ---------------------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_earlier_match():
    index = NgramIndex(2, 4)
    doc = list(range(100, 130))
    tokens = doc + [1, 2] + doc[:6]
    assert index.match(tokens) == (4, 6)  # doc[2:6] ends at 6; what follows is doc[6:]
    p = Proposer(SpeculativeConfig(num_speculative_tokens=3, adaptive=False))
    assert p.propose("r", tokens, 10) == doc[6:9]
    assert p.propose("r", tokens, 2) == doc[6:8]  # capped by what the request may still generate
    assert p.propose("s", [7, 8, 9, 10], 10) == []  # no earlier occurrence, and never itself
    # Incremental: appending keeps the index right (the match moves to the latest occurrence).
    tokens += doc[6:9] + [55, 56] + doc[3:5]
    assert p.propose("r", tokens, 10) == doc[5:8]


def test_suffix_automaton_finds_the_longest_earlier_match():
    rng = random.Random(0)
    seqs = [[rng.randrange(6) for _ in range(60)] for _ in range(4)]
    sam = SuffixAutomaton(max_tokens=10_000)
    for seq in seqs:
        sam.add_sequence(seq)
    query = [rng.randrange(6) for _ in range(40)]
    state, length = 0, 0
    for i, t in enumerate(query):
        state, length = sam.step(state, length, t)
        # Brute force: the longest suffix of query[:i+1] that is a substring of one sequence.
        best = 0
        for n in range(1, i + 2):
            pattern = query[i + 1 - n : i + 1]
            if any(pattern == s[j : j + n] for s in seqs for j in range(len(s) - n + 1)):
                best = n
        assert length == best, i
        if length:
            end = sam.first_end[state]
            assert sam.text[end + 1 - length : end + 1] == query[i + 1 - length : i + 1]


def test_suffix_method_uses_the_programs_earlier_requests():
    p = Proposer(SpeculativeConfig(method="suffix", num_speculative_tokens=4, adaptive=False))
    earlier = [9, 9, 40, 41, 42, 43, 44, 45, 46]
    p.finish("call-1", earlier, program_id="prog")
    assert p.propose("call-2", [3, 40, 41, 42], 10, program_id="prog") == [43, 44, 45, 46]
    assert p.propose("call-3", [3, 40, 41, 42], 10, program_id="other") == []
    assert p.propose("call-4", [3, 40, 41, 42], 10) == []  # no program: its own text only


def test_adaptive_controller_pauses_a_request_whose_drafts_fail():
    p = Proposer(SpeculativeConfig(num_speculative_tokens=4))
    tokens = [1, 2, 3, 4, 1, 2, 3]
    assert p.propose("r", tokens, 10) == [4, 1, 2, 3]
    for _ in range(4):
        p.observe("r", 4, 0)
    proposals = [p.propose("r", tokens, 10) for _ in range(6)]
    assert [] in proposals, "a request whose drafts are all rejected must pause proposing"
    p.observe("r", 4, 4)


@pytest.mark.parametrize(
    "bad",
    [
        '{"method": "eagle"}',
        '{"num_speculative_tokens": 0}',
        '{"prompt_lookup_min": 5, "prompt_lookup_max": 2}',
        '{"k": 3}',
        "not json",
    ],
)
def test_bad_speculative_config_is_refused(bad):
    with pytest.raises(InvalidRequest) as e:
        SpeculativeConfig.parse(bad)
    assert e.value.param == "speculative_config"


# ---- scheduler: drafts in the token budget, KV rolled back -------------------------------------------


def test_scheduler_verifies_drafts_and_rolls_back_rejected_slots(monkeypatch):
    drafts = iter([[901, 902, 903], [777, 906, 907]])  # one per decode step

    def propose(self, req_id, tokens, max_tokens, program_id=None):
        return next(drafts, [])[:max_tokens]

    monkeypatch.setattr(Proposer, "propose", propose)
    sched = make_scheduler(speculative_config={"method": "ngram"})
    req = make_req("a", range(8), max_tokens=10)
    sched.add(req)
    assert run_step(sched).plan == [("a", 8)]  # prefill samples 900
    step = run_step(sched)
    assert step.plan == [("a", 4)] and step.out.spec_token_ids == {"a": [901, 902, 903]}
    assert req.output_token_ids == [900, 901, 902, 903, 904]  # all accepted, and one more
    assert req.num_computed_tokens == 12
    step = run_step(sched)  # 904 is the last token; the draft 904? no: its draft is [904, 777, 5]
    assert req.output_token_ids[5:] == [905]  # 904 != 905: the first draft is rejected
    assert req.num_computed_tokens == 13  # 4 scheduled, 3 rejected: only the real token counts
    assert sched.stats.num_draft_tokens == 6 and sched.stats.num_accepted_tokens == 3
    # The blocks hold exactly what the request needs; no draft token was indexed for reuse.
    assert len(sched.kv.block_ids("a")) == -(-(8 + 4 + 4) // 4)
    probe = make_req("p", [*range(8), 900, 901, 902, 903, 904, 777, 906, 1])
    assert sched.kv.get_computed_blocks(probe).num_tokens == 12


# ---- end to end, greedy identical ------------------------------------------------------------------

PATHS = {
    "batched": {},
    "chunked": dict(max_num_batched_tokens=24),
    "preempted": dict(num_blocks=14, max_num_batched_tokens=4096),
}


def plain_run_and_oracle(model: str, dtype: str, monkeypatch):
    """Five prompts, the plain run's greedy outputs, and a proposer that drafts from them (3 of 4 right)."""
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 2000) for _ in range(20 + 7 * i)] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = LLM(model, dtype=dtype, num_blocks=256)
    want = {
        tuple(p): o.outputs[0].token_ids
        for p, o in zip(prompts, plain.generate(prompts, params), strict=True)
    }
    del plain

    def oracle(self, req_id, tokens, max_tokens, program_id=None):
        for prompt, out in want.items():
            if tuple(tokens[: len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                r = random.Random(len(tokens))
                return [t if r.random() < 0.75 else 3 for t in out[done : done + min(4, max_tokens)]]
        return []

    monkeypatch.setattr(Proposer, "propose", oracle)
    return prompts, params, want


@pytest.mark.parametrize("arch", ["llama", "glm4"])
@pytest.mark.parametrize("path", list(PATHS))
def test_greedy_output_is_identical_with_speculation(arch, path, tiny_model_dir, monkeypatch):
    model = str(tiny_model_dir(arch))
    prompts, params, want = plain_run_and_oracle(model, "float32", monkeypatch)
    llm = LLM(
        model, dtype="float32", speculative_config={"method": "ngram"}, **{"num_blocks": 256, **PATHS[path]}
    )
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [want[tuple(p)] for p in prompts]
    stats = llm.engine.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert stats.num_steps < 24 + len(prompts)  # several tokens per forward
    if path == "preempted":
        assert stats.num_preemptions > 0
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.pool.num_blocks
    # The prefix cache holds only real tokens: the same prompts again hit and give the same output.
    again = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in again] == [want[tuple(p)] for p in prompts]


@pytest.mark.parametrize("arch", ["llama", "glm4"])
def test_greedy_output_is_identical_with_speculation_in_bf16(arch, tiny_model_dir, monkeypatch):
    """bf16 on CPU: plain decode steps and draft verifications both run loom's native decode stack, one
    row per token, each row's numbers independent of the batch around it, so a verified token gets
    exactly what plain decoding gives it (random-weight bf16 models have near-ties everywhere: any
    difference in arithmetic would show)."""
    model = str(tiny_model_dir(arch))
    prompts, params, want = plain_run_and_oracle(model, "bfloat16", monkeypatch)
    llm = LLM(model, dtype="bfloat16", num_blocks=256, speculative_config={"method": "ngram"})
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [want[tuple(p)] for p in prompts]
    assert llm.engine.runner.model.model._native.stack is not None
    stats = llm.engine.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_seeded_sampling_with_speculation_is_reproducible(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(Proposer, "propose", lambda self, r, t, k, p=None: [t[-1], 7, 8][:k])
    llm = LLM(str(tiny_llama_dir), dtype="float32", num_blocks=128, speculative_config={"method": "ngram"})
    params = SamplingParams(temperature=0.9, seed=42, max_tokens=16, ignore_eos=True)
    first = llm.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids
    assert llm.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids == first
    assert llm.engine.stats.num_draft_tokens > 0


# ---- rejection sampling keeps the target distribution ----------------------------------------------


def _meta(params: SamplingParams, rows: int, gen: torch.Generator) -> SamplingMetadata:
    return SamplingMetadata([params] * rows, [[]] * rows, [[1]] * rows, [gen] * rows, [[]] * rows)


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4)]
)
def test_rejection_sampling_preserves_the_target_distribution(params):
    torch.manual_seed(0)
    vocab, trials = 6, 20_000
    logits = torch.randn(3, vocab)
    sampler = Sampler()
    gen = torch.Generator().manual_seed(1)
    meta = _meta(params, 3, gen)
    target = sampler.probs(sampler.processed(logits, meta), meta)
    draft = [int(target[0].argsort()[-2]), 1]  # a likely but not the likeliest first token
    first = torch.zeros(vocab)
    second_given_accept = torch.zeros(vocab)
    for _ in range(trials):
        out = verify(sampler, logits, draft, meta).token_ids
        first[out[0]] += 1
        if out[0] == draft[0]:
            second_given_accept[out[1]] += 1
    for counts, p in ((first, target[0]), (second_given_accept, target[1])):
        freq = counts / counts.sum()
        # Total variation against the exact target; 20k draws put the noise near 0.01.
        assert 0.5 * (freq - p).abs().sum() < 0.025, (freq, p)


def test_greedy_verification_accepts_exactly_the_argmax_prefix():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    meta = _meta(SamplingParams(temperature=0), 3, torch.Generator())
    assert verify(Sampler(), logits, [1, 0], meta).token_ids == [1, 0, 2]
    assert verify(Sampler(), logits, [1, 2], meta).token_ids == [1, 0]
    assert verify(Sampler(), logits, [2, 0], meta).token_ids == [1]
