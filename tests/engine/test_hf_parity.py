"""Greedy float32 parity with HF transformers, for every architecture and every engine path.

HF runs one prompt at a time (`generate`, greedy); loom runs all prompts together in one `generate`
call. Tokens must be identical, except that a divergence is accepted at a step where HF's own top-2
logits are within NEAR_TIE of each other (float32 summation order then decides, legitimately), after
which the rest of that sequence is not compared. Log-probabilities of the first generated token and
of every prompt token must match HF's within LOGPROB_ATOL.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from loom import LLM, SamplingParams

ARCHS = ["llama", "qwen2", "glm", "glm4"]
NEAR_TIE = 1e-3
LOGPROB_ATOL = 2e-4
MAX_TOKENS = 24
PROMPT_LENS = [3, 17, 64, 111, 200, 300]


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


class HFReference:
    def __init__(self, path):
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        ids = torch.tensor([prompt])
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
        return out.sequences[0, len(prompt) :].tolist(), [s[0] for s in out.scores]

    @torch.inference_mode()
    def logprobs(self, tokens: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([tokens])).logits[0].float().log_softmax(-1)


def assert_greedy_match(ours: list[int], ref: list[int], scores: list[torch.Tensor], what: str) -> None:
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if a == b:
            continue
        top2 = scores[i].topk(2).values
        gap = (top2[0] - top2[1]).item()
        assert gap < NEAR_TIE, f"{what}: token {i} is {a}, HF says {b} (HF top-2 gap {gap:.2e} is no tie)"
        return  # legitimate near-tie: the sequences may differ from here on


@pytest.fixture(scope="module", params=ARCHS)
def arch_setup(request, tiny_model_dir):
    path = tiny_model_dir(request.param)
    hf = HFReference(path)
    vocab = hf.model.config.vocab_size
    prompts = make_prompts(vocab)
    refs = [hf.greedy(p, MAX_TOKENS) for p in prompts]
    return request.param, path, hf, prompts, refs


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)

ENGINE_PATHS = {
    # one step can hold every prompt whole
    "batched": dict(max_num_batched_tokens=4096, num_blocks=512),
    # decodes split into one attention group per distinct length (see group_by_length)
    "decode_groups": dict(max_num_batched_tokens=4096, num_blocks=512),
    # prompts are split into chunks of at most 48 tokens, mixed with decodes in each step
    "chunked_prefill": dict(max_num_batched_tokens=48, num_blocks=512),
    # 30 blocks of 16 tokens: the first five prompts are admitted (27 blocks) and their decodes outgrow the
    # pool, so requests are preempted and recomputed
    # (with prefix caching a preempted request may find its own blocks again; without, all is recomputed).
    "preempted": dict(max_num_batched_tokens=4096, num_blocks=30),
    "preempted_no_cache": dict(max_num_batched_tokens=4096, num_blocks=30, enable_prefix_caching=False),
}


@pytest.mark.parametrize("path_name", list(ENGINE_PATHS))
def test_greedy_matches_hf(arch_setup, path_name):
    arch, path, hf, prompts, refs = arch_setup
    llm = LLM(str(path), dtype="float32", **ENGINE_PATHS[path_name])
    if path_name == "decode_groups":
        llm.engine.runner.decode_group_cost = 0
    outs = llm.generate(prompts, GREEDY)
    for k, (out, (ref_tokens, scores)) in enumerate(zip(outs, refs, strict=True)):
        c = out.outputs[0]
        assert c.finish_reason == "length" and len(c.token_ids) == MAX_TOKENS
        assert_greedy_match(c.token_ids, ref_tokens, scores, f"{arch}/{path_name} prompt {k}")
        # Logits: the first generated token's top logprobs against HF's distribution at the same spot.
        ref_lp = scores[0].float().log_softmax(-1)
        for token, lp in c.logprobs[0].items():
            assert abs(lp - ref_lp[token].item()) < LOGPROB_ATOL, (
                f"{arch}/{path_name} prompt {k} token {token}"
            )
    if path_name.startswith("preempted"):
        assert llm.engine.stats.num_preemptions > 0, "the small pool should have forced preemption"
    if path_name == "chunked_prefill":
        assert llm.engine.stats.num_steps > len(prompts) + MAX_TOKENS
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_prefix_cached_matches_hf(arch_setup):
    """Second pass over the same prompts (and over prompt + first answer, a follow-up turn) hits the
    prefix cache; outputs stay identical to HF."""
    arch, path, hf, prompts, refs = arch_setup
    llm = LLM(str(path), dtype="float32", num_blocks=512, enable_prefix_caching=True)
    first = llm.generate(prompts, GREEDY)
    hits_before = llm.engine.kv.stats.hits
    second = llm.generate(prompts, GREEDY)
    assert llm.engine.kv.stats.hits - hits_before >= sum((len(p) - 1) // 16 * 16 for p in prompts)
    for k, (a, b) in enumerate(zip(first, second, strict=True)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, f"{arch} prompt {k} changed on a cache hit"
        assert b.num_cached_tokens == (len(prompts[k]) - 1) // 16 * 16
    # A follow-up turn: the previous answer's blocks are reused too.
    k = 4
    follow = prompts[k] + first[k].outputs[0].token_ids + [5, 6, 7]
    out = llm.generate([follow], GREEDY)[0]
    assert out.num_cached_tokens >= (len(prompts[k]) + MAX_TOKENS) // 16 * 16 - 16
    ref_tokens, scores = hf.greedy(follow, MAX_TOKENS)
    assert_greedy_match(out.outputs[0].token_ids, ref_tokens, scores, f"{arch} follow-up turn")


def test_prompt_logprobs_match_hf(arch_setup):
    """Logits at every prompt position (the echo path), through chunked prefill."""
    arch, path, hf, prompts, _ = arch_setup
    llm = LLM(str(path), dtype="float32", num_blocks=512, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=0, prompt_logprobs=1)
    outs = llm.generate(prompts[2:5], params)
    for prompt, out in zip(prompts[2:5], outs, strict=True):
        ref = hf.logprobs(prompt)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        ours = torch.tensor([out.prompt_logprobs[i][prompt[i]] for i in range(1, len(prompt))])
        theirs = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(ours, theirs, atol=LOGPROB_ATOL, rtol=0)
        assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
