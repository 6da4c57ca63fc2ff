"""Linear layers and their float methods: plain F.linear, and oneDNN-prepacked bfloat16 where the CPU
can run it (AVX-512 or AVX-NE-CONVERT); on AVX2 bfloat16 is computed in float32 (Bf16Widened: the
weight stays bf16; Float32Compute without loom's kernels: a float32 copy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loom.kernels import cpu
from loom.layers.linear import Linear
from loom.layers.quant import (
    UNQUANTIZED,
    Bf16Widened,
    Float32Compute,
    OneDNNPrepacked,
    can_prepack,
    linear_method,
    process_linears,
)


def tied_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(100, 64, dtype=torch.bfloat16)
    model.head = Linear(64, 100).to(torch.bfloat16)
    model.head.weight = model.embed.weight  # tied, as lm_head to embed_tokens
    model.proj = Linear(64, 48, bias=True).to(torch.bfloat16)
    torch.nn.init.normal_(model.proj.weight)
    torch.nn.init.normal_(model.proj.bias)
    return model


def test_float_method_matches_f_linear_and_keeps_only_shared_weights():
    model = tied_model()
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    expected = F.linear(x, model.proj.weight, model.proj.bias).float()
    head_expected = F.linear(x, model.embed.weight).float()
    method = linear_method(None, 128, torch.bfloat16, torch.device("cpu"))

    if not can_prepack(torch.bfloat16, torch.device("cpu")):
        # A CPU without AVX-512 or AVX-NE-CONVERT: a float32 GEMM (bf16's is slow there), on weights
        # kept in bf16 where loom's kernels build.
        widened = cpu.available()
        assert isinstance(method, Bf16Widened if widened else Float32Compute)
        assert method.reference() is UNQUANTIZED
        assert process_linears(model, method) == {method.name: 2}
        torch.testing.assert_close(model.proj(x).float(), expected, rtol=1e-2, atol=0.25)
        torch.testing.assert_close(model.head(x).float(), head_expected, rtol=1e-2, atol=0.25)
        if widened:
            assert model.proj.weight.dtype == torch.bfloat16 and not hasattr(model.proj, "weight_fp32")
        else:
            assert model.proj.weight.numel() == 0 and model.proj.weight_fp32.dtype == torch.float32
        assert model.embed.weight.shape == (100, 64)  # the tied one stays for the embedding lookup
        return
    assert isinstance(method, OneDNNPrepacked) and method.reference() is UNQUANTIZED
    assert process_linears(model, method) == {"onednn-bf16": 2}
    torch.testing.assert_close(model.proj(x).float(), expected, rtol=1e-2, atol=0.25)
    torch.testing.assert_close(model.head(x).float(), head_expected, rtol=1e-2, atol=0.25)
    assert model.proj.weight.numel() == 0  # the plain copy is freed
    assert model.embed.weight.shape == (100, 64)  # the tied one stays for the embedding lookup


def test_float32_is_never_prepacked():
    assert linear_method(None, 128, torch.float32, torch.device("cpu")) is UNQUANTIZED
    assert not can_prepack(torch.float32, torch.device("cpu"))


def test_linear_forward_keeps_leading_dims_and_adds_bias():
    layer = Linear(8, 4, bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert "method=float" in repr(layer)
