"""bfloat16: loom is as close to the float32 reference as HF transformers' own bfloat16 is.

bf16 rounding makes token-identical parity meaningless (random-weight models have near-ties
everywhere), so the measure is the prompt log-probabilities' error against HF float32: loom's, with its
prepacked oneDNN linears on CPU, must be of the same size as HF bf16's."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from loom import LLM, SamplingParams
from loom.layers.linear import Linear, can_prepack, prepack_linears

ARCHS = ["llama", "qwen2", "glm", "glm4"]


def hf_logprobs(path, dtype: torch.dtype, tokens: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([tokens])).logits[0].float()
    return logits.log_softmax(-1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_error_is_no_larger_than_hf_bf16(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    rng = random.Random(1)
    prompt = [rng.randrange(3, 1000) for _ in range(150)]
    reference = hf_logprobs(path, torch.float32, prompt)
    hf_error = (hf_logprobs(path, torch.bfloat16, prompt) - reference).abs().mean().item()

    llm = LLM(str(path), dtype="bfloat16", num_blocks=64, max_num_batched_tokens=64)  # chunked prefill
    if can_prepack(torch.bfloat16, torch.device("cpu")):
        assert llm.engine.runner.model.model.layers[0].mlp.down_proj.packed is not None
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=1), use_tqdm=False)[0]
    ours = torch.tensor([out.prompt_logprobs[i][prompt[i]] for i in range(1, len(prompt))])
    our_error = (ours - reference).abs().mean().item()
    assert our_error <= 1.5 * hf_error + 1e-3, (our_error, hf_error)


def test_prepacked_linear_matches_f_linear_and_keeps_only_shared_weights():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(100, 64, dtype=torch.bfloat16)
    model.head = Linear(64, 100).to(torch.bfloat16)
    model.head.weight = model.embed.weight  # tied, as lm_head to embed_tokens
    model.proj = Linear(64, 48, bias=True).to(torch.bfloat16)
    torch.nn.init.normal_(model.proj.weight)
    torch.nn.init.normal_(model.proj.bias)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x, model.proj.weight, model.proj.bias).float()
    head_expected = torch.nn.functional.linear(x, model.embed.weight).float()

    if not can_prepack(torch.bfloat16, torch.device("cpu")):
        # A CPU without AVX-512 or AVX-NE-CONVERT: nothing is prepacked and plain F.linear runs.
        assert prepack_linears(model) == 0
        assert model.proj.packed is None
        torch.testing.assert_close(model.proj(x).float(), expected, rtol=0, atol=0)
        return
    assert prepack_linears(model) == 2
    torch.testing.assert_close(model.proj(x).float(), expected, rtol=1e-2, atol=0.25)
    torch.testing.assert_close(model.head(x).float(), head_expected, rtol=1e-2, atol=0.25)
    assert model.proj.weight.numel() == 0  # the plain copy is freed
    assert model.embed.weight.shape == (100, 64)  # the tied one stays for the embedding lookup
