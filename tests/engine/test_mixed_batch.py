"""Requests of different kinds in one step get exactly what they get alone: greedy sampling next to
prompt-logprob (echo) requests, in every order within the batch. (Regression: the runner once took the
last rows of the logits as the sampling rows, so a prompt-logprob request laid out after a sampling one
handed it a prompt row's logits.)"""

from __future__ import annotations

import itertools
import random

import pytest

from loom import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6)
ECHO_ONLY = SamplingParams(max_tokens=0, prompt_logprobs=2)
ECHO_AND_SAMPLE = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1, logprobs=1)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", num_blocks=128, enable_prefix_caching=False)


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, 2000) for _ in range(n)] for n in (9, 23, 14, 30)]


def _key(out):
    c = out.outputs[0]
    lps = None
    if out.prompt_logprobs is not None:
        lps = [None if e is None else sorted(e.items()) for e in out.prompt_logprobs]
    return c.token_ids, lps


def test_sampling_and_prompt_logprob_requests_in_every_order(llm):
    prompts = _prompts()
    kinds = [GREEDY, ECHO_ONLY, GREEDY, ECHO_AND_SAMPLE]
    alone = [_key(llm.generate([p], k, use_tqdm=False)[0]) for p, k in zip(prompts, kinds, strict=True)]
    for order in itertools.permutations(range(4)):
        outs = llm.generate([prompts[i] for i in order], [kinds[i] for i in order], use_tqdm=False)
        for i, out in zip(order, outs, strict=True):
            tokens, lps = _key(out)
            assert tokens == alone[i][0], (order, i)
            if lps is not None:
                for got, want in zip(lps, alone[i][1], strict=True):
                    if want is None:
                        assert got is None
                        continue
                    assert [t for t, _ in got] == [t for t, _ in want]
                    assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-4)
