"""The offline LLM API: inputs, outputs, sampling features and bad input."""

from __future__ import annotations

import pytest

from loom import LLM, SamplingParams
from loom.errors import ContextLengthExceeded, InvalidRequest


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", num_blocks=256, max_model_len=512)


def test_outputs_in_input_order_for_strings_and_ids(llm):
    prompts = ["The quick brown fox", [5, 6, 7, 8, 9], "def f(x):", [100] * 40]
    params = [SamplingParams(temperature=0, max_tokens=k) for k in (3, 5, 7, 9)]
    outs = llm.generate(prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5, 7, 9]
    assert outs[0].prompt == "The quick brown fox"
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("The quick brown fox")
    assert outs[1].prompt_token_ids == [5, 6, 7, 8, 9]
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "length"
        assert c.text == llm.tokenizer.decode(c.token_ids)
    # Alone, each prompt gives the same greedy tokens as in the batch.
    alone = llm.generate(prompts[3], params[3])[0]
    assert alone.outputs[0].token_ids == outs[3].outputs[0].token_ids


def test_seed_reproducible_whatever_the_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234)
    alone = llm.generate(["Once upon a time"], p)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=12)
    batch = llm.generate(["x y z", "Once upon a time", "1 2 3 4"], [others, p, others])
    assert batch[1].outputs[0].token_ids == alone
    different = llm.generate(["Once upon a time"], SamplingParams(temperature=1.0, max_tokens=12, seed=99))[0]
    assert different.outputs[0].token_ids != alone


def test_extreme_seeds_run(llm):
    """The ends of the accepted seed range reach torch's manual_seed without overflowing (n=2 seeds the
    second sequence from a hash of the seed, too)."""
    for seed in (2**64 - 1, -(2**63)):
        out = llm.generate("Hello", SamplingParams(n=2, temperature=1.0, max_tokens=3, seed=seed))[0]
        assert [len(c.token_ids) for c in out.outputs] == [3, 3]


def test_n_completions(llm):
    out = llm.generate("Hello", SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    seqs = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(seqs)) > 1, "n sampled completions should differ"
    again = llm.generate("Hello", SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7))[0]
    assert [tuple(c.token_ids) for c in again.outputs] == seqs


def test_stop_string_and_stop_token(llm):
    free = llm.generate("abc", SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert len(free.text) > 4
    stop = free.text[2:4]
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[: free.text.index(stop)]
    tok = free.token_ids[5]
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[tok]))[0].outputs[
        0
    ]
    assert out.finish_reason == "stop" and out.stop_reason == tok
    assert out.token_ids == free.token_ids[: free.token_ids.index(tok) + 1]


def test_min_tokens_bans_eos(llm):
    eos = sorted(llm.input.eos_token_ids)
    # Make EOS the only allowed-by-stop token: stop_token_ids on the most likely first token.
    first = llm.generate("abc", SamplingParams(temperature=0, max_tokens=1))[0].outputs[0].token_ids[0]
    out = llm.generate(
        "abc", SamplingParams(temperature=0, max_tokens=6, min_tokens=4, stop_token_ids=[first])
    )[0]
    assert len(out.outputs[0].token_ids) >= 4
    assert first not in out.outputs[0].token_ids[:4]
    assert not set(eos) & set(out.outputs[0].token_ids[:4])


def test_chat_applies_template(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4))[0]
    rendered = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out.prompt_token_ids == llm.tokenizer.encode(rendered, add_special_tokens=False)
    assert rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("prompt", "params", "error", "param"),
    [
        ("", SamplingParams(), InvalidRequest, "prompt"),
        ([], SamplingParams(), InvalidRequest, "prompt"),
        ([1, 2, 10**6], SamplingParams(), InvalidRequest, "prompt"),
        ([1, 2, -1], SamplingParams(), InvalidRequest, "prompt"),
        ("hello", SamplingParams(max_tokens=600), ContextLengthExceeded, "max_tokens"),
        ([7] * 512, SamplingParams(max_tokens=None), ContextLengthExceeded, "prompt"),
    ],
)
def test_bad_input_is_rejected_and_engine_keeps_serving(llm, prompt, params, error, param):
    with pytest.raises(error) as info:
        llm.generate(["fine prompt", prompt], params)
    assert info.value.param == param
    assert not llm.engine.has_unfinished(), "a rejected batch must leave nothing behind"
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks
    out = llm.generate("still serving", SamplingParams(temperature=0, max_tokens=3))[0]
    assert len(out.outputs[0].token_ids) == 3


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(stop=[""]), "stop"),
        (dict(logprobs=21), "logprobs"),
        (dict(n=0), "n"),
    ],
)
def test_sampling_params_name_the_field(kwargs, param):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert param in str(info.value)


def test_mismatched_params_list(llm):
    with pytest.raises(InvalidRequest):
        llm.generate(["a", "b"], [SamplingParams()])


def test_unknown_llm_argument(tiny_llama_dir):
    with pytest.raises(TypeError, match="max_num_sequences"):
        LLM(str(tiny_llama_dir), max_num_sequences=4)


def test_bfloat16_close_to_float32(tiny_llama_dir, llm):
    bf = LLM(str(tiny_llama_dir), dtype="bfloat16", num_blocks=64)
    assert bf.engine.runner.dtype.is_floating_point and str(bf.engine.runner.dtype) == "torch.bfloat16"
    p = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    a = llm.generate([[11, 12, 13, 14, 15, 16]], p)[0].outputs[0].logprobs[0]
    b = bf.generate([[11, 12, 13, 14, 15, 16]], p)[0].outputs[0].logprobs[0]
    common = set(a) & set(b)
    assert len(common) >= 3
    # bf16 has an 8-bit mantissa: logprobs agree to a few hundredths on this 4-layer model.
    assert max(abs(a[t] - b[t]) for t in common) < 0.15
