"""Structured output through the real engine (LLM on the random-weight tiny models): every output of the
40+ schemas validates, greedy and at temperature 1.0; regexes and choices match; n > 1, min_tokens and
ignore_eos; speculative decoding with a grammar keeps greedy output and validity; requests without a
grammar build no mask; a failed matcher fails its request alone.

A random model has no reason to ever close a string, so every request here carries a logit_bias of +5 on
the tokens made only of closing characters (and `@`, `.`, which an email needs before its closing quote)
and on EOS: a real model closes what it opens; the grammar does the rest.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from grammar_schemas import SCHEMAS

from loom import LLM, SamplingParams
from loom.engine.request import RequestStatus
from loom.errors import RequestFailed

PROMPT = "Write the JSON:"
CLOSING = set('"}]),@.')


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def llm(request, tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir(request.param)), num_blocks=1024, max_num_seqs=128, num_threads=1)


def closer_bias(llm: LLM, value: float = 5.0) -> dict[int, float]:
    tok = llm.tokenizer
    ids = [
        t for t in range(tok.vocab_size) if set(tok.decode([t], skip_special_tokens=False) or "x") <= CLOSING
    ]
    return dict.fromkeys([*ids, *tok.eos_token_ids], value)


def _validator(schema: dict) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def test_every_schema_validates_greedy_and_at_temperature_one(llm):
    assert len(SCHEMAS) >= 40
    bias = closer_bias(llm)
    cases = [(name, t) for name in SCHEMAS for t in (0.0, 1.0)]
    params = [
        SamplingParams(
            max_tokens=256,
            temperature=t,
            seed=11,
            logit_bias=bias,
            structured_outputs={"json": SCHEMAS[name]},
        )
        for name, t in cases
    ]
    outputs = llm.generate([PROMPT] * len(cases), params)
    for (name, t), out in zip(cases, outputs, strict=True):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (name, t, c.text)  # the grammar ended it, not max_tokens
        _validator(SCHEMAS[name]).validate(json.loads(c.text))


REGEXES = [
    r"[a-z]{3}-[0-9]{2}",
    r"(yes|no)!?",
    r"\+?[0-9]{2,3} [0-9]{3}-[0-9]{4}",
    r"[A-Z][a-z]{0,8}( [A-Z][a-z]{0,8}){0,2}",
]
CHOICES = [["yes", "no"], ["red", "green", "blue", "light blue"], ["Paris", "Tokyo", "New York City"]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regexes_and_choices_always_match(llm, temperature):
    specs = [{"regex": r} for r in REGEXES] + [{"choice": c} for c in CHOICES]
    params = [
        SamplingParams(max_tokens=64, temperature=temperature, seed=k, structured_outputs=s, n=3)
        for k, s in enumerate(specs)
    ]
    outputs = llm.generate([PROMPT] * len(specs), params)
    for spec, out in zip(specs, outputs, strict=True):
        assert len(out.outputs) == 3  # n > 1: each sequence has its own matcher
        for c in out.outputs:
            assert c.finish_reason == "stop"
            if "regex" in spec:
                assert re.fullmatch(spec["regex"], c.text), (spec, c.text)
            else:
                assert c.text in spec["choice"], (spec, c.text)


def test_grammar_wins_over_min_tokens_and_ignore_eos(llm):
    choice = {"choice": ["a", "b"]}
    outs = llm.generate(
        [PROMPT] * 2,
        [
            SamplingParams(max_tokens=20, temperature=0, min_tokens=10, structured_outputs=choice),
            SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, structured_outputs=choice),
        ],
    )
    for out in outs:
        c = out.outputs[0]
        assert c.text in ("a", "b") and c.finish_reason == "stop" and len(c.token_ids) <= 2


def test_a_grammar_that_allows_only_eos_ends_despite_min_tokens(llm):
    # After "done" nothing but EOS may follow; min_tokens would ban EOS, leaving no token at all.
    out = llm.generate(
        [PROMPT], SamplingParams(max_tokens=8, min_tokens=8, structured_outputs={"regex": "done"})
    )
    c = out[0].outputs[0]
    assert c.text == "done" and c.finish_reason == "stop"


def test_requests_without_a_grammar_build_no_mask(llm):
    manager = llm.engine.structured
    calls = []
    original = manager.bitmask_for

    def counting(sched, requests):
        result = original(sched, requests)
        calls.append(result)
        return result

    manager.bitmask_for = counting
    try:
        llm.generate([PROMPT] * 4, SamplingParams(max_tokens=8, temperature=0))
    finally:
        del manager.bitmask_for
    assert calls and all(mask is None for mask in calls)


def test_grammar_and_plain_requests_share_a_batch(llm):
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = llm.generate([PROMPT], plain)[0].outputs[0].token_ids
    mixed = llm.generate(
        [PROMPT, PROMPT],
        [plain, SamplingParams(max_tokens=12, temperature=0, structured_outputs={"regex": "[0-9]{3}"})],
    )
    assert mixed[0].outputs[0].token_ids == alone  # the mask touched only its own row
    assert re.fullmatch("[0-9]{3}", mixed[1].outputs[0].text)


def test_a_failed_matcher_fails_its_request_alone(llm):
    engine = llm.engine
    good = llm.input.process("good", llm.input.encode(PROMPT), SamplingParams(max_tokens=6, temperature=0))
    bad = llm.input.process(
        "bad", llm.input.encode(PROMPT), SamplingParams(max_tokens=6, structured_outputs={"regex": "[a-z]+"})
    )
    for job in (good, bad):
        llm.output.add_request(job)
        engine.add_request(job.seqs[0])
    # What llguidance does when a mask step exceeds its resource limits: the matcher is in an error state.
    engine.scheduler.requests["bad"].grammar.fail("lexer fuel exhausted (simulated)")
    finished, failed = {}, {}
    while engine.has_unfinished():
        processed = llm.output.process_outputs(engine.step())
        failed.update(processed.failed)
        for out in processed.request_outputs:
            if out.finished:
                finished[out.request_id] = out
    assert "structured output failed: lexer fuel exhausted (simulated)" in failed["bad"]
    assert finished["good"].outputs[0].finish_reason == "length"


def test_llm_raises_a_grammar_failure_as_request_failed(llm):
    # The public path: LLM.generate reports the engine's error for the request.
    job = llm.input.process(
        "x", llm.input.encode(PROMPT), SamplingParams(max_tokens=4, structured_outputs={"regex": "a+"})
    )
    llm.output.add_request(job)
    llm.engine.add_request(job.seqs[0])
    llm.engine.scheduler.requests["x"].grammar.fail("simulated")
    with pytest.raises(RequestFailed, match="structured output failed: simulated"):
        llm._run(["x"], use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_speculative_decoding_with_a_grammar_keeps_greedy_output(tiny_llama_dir):
    """Drafts are cut to what the grammar allows, verify rows are masked with the matcher walked through
    the drafts, and rejected drafts never reach the matcher: greedy output is the non-speculative one."""
    schema = SCHEMAS["array_of_objects"]
    # A prompt that repeats what the output will look like, so n-gram drafts are proposed and accepted.
    prompt = 'Examples: [{"k": "a", "v": 1}, {"k": "b", "v": 2}] and [{"k": "a", "v": 1}, {"k": "b", "v": 2}]'
    base = LLM(str(tiny_llama_dir), num_blocks=512, num_threads=1)
    bias = closer_bias(base)
    specs = [
        {"json": schema},
        {"regex": r"\[\{\"k\": \"[a-z]\", \"v\": [0-9]\}(, \{\"k\": \"[a-z]\", \"v\": [0-9]\}){0,3}\]"},
    ]
    params = [
        SamplingParams(max_tokens=200, temperature=0, logit_bias=bias, structured_outputs=s) for s in specs
    ]
    expected = [o.outputs[0].token_ids for o in base.generate([prompt] * 2, params)]
    spec = LLM(
        str(tiny_llama_dir),
        num_blocks=512,
        num_threads=1,
        speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1},
    )
    outs = spec.generate([prompt] * 2, params)
    stats = spec.engine.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    assert stats.num_accepted_tokens < stats.num_draft_tokens  # some drafts were rejected and rolled back
    for out, want, s in zip(outs, expected, specs, strict=True):
        c = out.outputs[0]
        assert c.token_ids == want
        assert c.finish_reason == "stop"
        if "json" in s:
            _validator(schema).validate(json.loads(c.text))
        else:
            assert re.fullmatch(s["regex"], c.text)


def test_finish_reasons_of_grammar_requests(llm):
    # A grammar that cannot finish within max_tokens is cut as usual ("length").
    out = llm.generate(
        [PROMPT], SamplingParams(max_tokens=3, temperature=0, structured_outputs={"regex": "[a-z]{200}"})
    )
    assert out[0].outputs[0].finish_reason == "length"
    assert RequestStatus.FINISHED_ERROR.finished
