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
from loom.layers.quant import OneDNNPrepacked, can_prepack

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
        assert isinstance(llm.engine.runner.model.model.layers[0].mlp.down_proj.method, OneDNNPrepacked)
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=1), use_tqdm=False)[0]
    ours = torch.tensor([out.prompt_logprobs[i][prompt[i]] for i in range(1, len(prompt))])
    our_error = (ours - reference).abs().mean().item()
    assert our_error <= 1.5 * hf_error + 1e-3, (our_error, hf_error)
