"""Each LinearMethod against its plain-PyTorch twin, on random matrices of odd shapes and on packed layers.

Kernel vs twin: both see the same quantized weight and the same bfloat16-rounded input, and both round
the result to bfloat16; only float32 summation order differs, which flips a rounding in a few outputs in
ten thousand. So outputs must be identical except in at most MAX_DIFFERING of them, each within two
bfloat16 ulps. The quantization itself is checked against its bound: every weight within half a step of
its dequantized value.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom.errors import InvalidRequest
from loom.kernels import cpu as kernels
from loom.layers.linear import Linear, MergedLinear
from loom.layers.quant import (
    UNQUANTIZED,
    Bf16Widened,
    Float32Compute,
    Int4,
    Int8,
    LinearMethod,
    OneDNNPrepacked,
    can_prepack,
    check_supported,
    linear_method,
    process_linears,
    weight_bytes,
)
from loom.layers.quant.int4 import dequantize_int4, quantize_int4
from loom.layers.quant.int8 import dequantize_int8, quantize_int8

MAX_DIFFERING = 0.01  # fraction of outputs where kernel and twin may differ (by a rounding)
BF16_ULP = 2**-7  # relative spacing of bfloat16 values (at most)
# Relative Frobenius error of the quantized product against float F.linear, on N(0, 1) weights. Rounding to
# a uniform grid errs by step / sqrt(12): int8's step is ~7/254 of a row's spread (~0.8%, plus bfloat16
# inputs), int4's ~5/15 of a group's (~8-10%).
QUANT_ERROR = {"int8": 0.02, "int4": 0.15}

METHODS = [Int8(), Int4(32), Int4(64), Int4(128)]
# (out, in): out not a multiple of 16 (int4 pads it), single rows, the tiny models' shapes, a wide one
SHAPES = [(96, 256), (40, 128), (1000, 384), (1, 128), (2048, 128), (128, 384)]
# 7: a partial tile of the int4 kernel's 4 rows; 33 and 130, prefill-sized
ROWS = [1, 7, 33, 130]


def ids(m: LinearMethod) -> str:
    return m.name + (f"-g{m.group_size}" if isinstance(m, Int4) else "")


def pair(method: LinearMethod, out_f: int, in_f: int, dtype: torch.dtype, seed: int = 0):
    """Two layers with the same random float weight and bias: one with the method, one with its twin;
    and the float weight itself."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=gen).to(dtype)
    bias = torch.randn(out_f, generator=gen).to(dtype)
    layers = []
    for m in (method, method.reference()):
        layer = Linear(in_f, out_f, bias=True).to(dtype)
        layer.weight.data.copy_(weight)
        layer.bias.data.copy_(bias)
        m.process_weights(layer, keep_weight=False)
        layer.method = m
        layers.append(layer)
    return layers[0], layers[1], weight, bias


def assert_kernel_matches_twin(
    ours: torch.Tensor, twin: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    ours, twin = ours.float(), twin.float()
    differ = (ours != twin).float().mean().item()
    assert differ <= MAX_DIFFERING, f"{differ:.2%} of outputs differ"
    # Two ulps of the product (rounded to bfloat16 before the bias is added) and of the sum (rounded again
    # in a bfloat16 model).
    product = (twin - bias.float()).abs() if bias is not None else twin.abs()
    excess = (ours - twin).abs() - 2 * BF16_ULP * (product + twin.abs()) - 1e-6
    assert excess.max() <= 0, f"kernel and twin differ by more than two bfloat16 ulps: {excess.max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", METHODS, ids=ids)
def test_method_matches_twin_and_float(method, shape, dtype):
    out_f, in_f = shape
    if isinstance(method, Int4) and in_f % method.group_size:
        pytest.fail("SHAPES must divide by every group size")
    layer, twin, weight, bias = pair(method, out_f, in_f, dtype)
    assert layer.weight.numel() == 0 and twin.weight.numel() == 0  # the float copies are gone
    gen = torch.Generator().manual_seed(1)
    errors, norms = [], []
    for rows in ROWS:
        x = torch.randn(rows, in_f, generator=gen).to(dtype)
        ours = layer(x)
        assert ours.dtype == dtype and ours.shape == (rows, out_f)
        assert_kernel_matches_twin(ours, twin(x), bias)
        exact = F.linear(x.float(), weight.float(), bias.float())
        errors.append((ours.float() - exact).norm() ** 2)
        norms.append(exact.norm() ** 2)
    rel = (sum(errors) / sum(norms)).sqrt().item()
    assert rel < QUANT_ERROR[method.name], rel
    # Leading dimensions are kept: [batch, seq, in] -> [batch, seq, out].
    x3 = torch.randn(2, 3, in_f, generator=gen).to(dtype)
    torch.testing.assert_close(layer(x3), layer(x3.reshape(6, in_f)).reshape(2, 3, out_f))


@pytest.mark.parametrize("method", METHODS, ids=ids)
def test_twins_have_no_stack_form(method):
    """A twin is plain PyTorch: a model built with twins keeps its modules, never the native stack."""
    _, twin, _, _ = pair(method, 32, 128, torch.bfloat16)
    assert twin.method.stack_linear(twin) is None


def test_int8_quantization_is_within_half_a_step():
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    w[5] = 0  # an all-zero row
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.dtype == torch.bfloat16
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale.float()[:, None] / 2 * 1.0001).all()
    assert (q[5] == 0).all()
    # Symmetric: negating the weight negates the codes.
    assert torch.equal(quantize_int8(-w)[0], -q)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_quantization_is_within_half_a_step(group_size):
    w = torch.randn(48, 256) + torch.linspace(-2, 2, 48)[:, None]  # groups that do not straddle 0
    w[3, :group_size] = 0.7  # a constant group
    q, scale, zero = quantize_int4(w, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert scale.shape == zero.shape == (48, 256 // group_size)
    deq = dequantize_int4(q, scale, zero)
    step = scale.float().repeat_interleave(group_size, dim=1)
    # Half a step, plus what rounding zero to bfloat16 may shift the grid by.
    slack = zero.float().abs().repeat_interleave(group_size, dim=1) * 2**-8
    assert ((deq - w).abs() <= step / 2 * 1.0001 + slack).all()
    assert torch.allclose(deq[3, :group_size], torch.tensor(0.7), atol=0.7 * 2**-8)


def test_int4_needs_group_size_dividing_in_features():
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_int4(torch.randn(16, 96), 64)


def test_int8_needs_in_features_divisible_by_8():
    # The kernel silently computes garbage (or crashes) on other widths, so quantizing refuses them.
    with pytest.raises(ValueError, match="divisible by 8"):
        quantize_int8(torch.randn(16, 100))


@pytest.mark.parametrize("method", [Int8(), Int4(32)], ids=ids)
def test_packed_layer_matches_its_shards(method):
    """A MergedLinear (q/k/v packed, loaded shard by shard) quantizes each output channel as the separate
    layers would: its output, split, matches three separately quantized twins."""
    hidden, sizes = 128, [128, 64, 64]
    gen = torch.Generator().manual_seed(0)
    shards = {name: torch.randn(size, hidden, generator=gen) for name, size in zip("qkv", sizes, strict=True)}
    merged = MergedLinear(hidden, sizes, list("qkv"))
    for name, w in shards.items():
        merged.weight.weight_loader(merged.weight, w, name)
    process_linears(merged, method)
    assert merged.method is method and merged.weight.numel() == 0
    x = torch.randn(5, hidden, generator=gen)
    parts = merged(x).split(sizes, dim=-1)
    for (name, w), part in zip(shards.items(), parts, strict=True):
        alone = Linear(hidden, w.shape[0])
        alone.weight.data.copy_(w)
        process_linears(alone, method, reference=True)
        assert alone.method.name == method.name + "-reference", name
        assert_kernel_matches_twin(part, alone(x))


def test_tied_weight_stays_for_the_embedding_and_memory_shrinks():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(256, 128)
    model.head = Linear(128, 256)
    model.head.weight = model.embed.weight  # tied, as lm_head to embed_tokens
    model.proj = Linear(128, 384)
    torch.nn.init.normal_(model.proj.weight)
    before = weight_bytes(model)
    counts = process_linears(model, Int8())
    assert counts == {"int8": 2}
    assert model.embed.weight.shape == (256, 128)  # still there for the lookup
    assert model.proj.weight.numel() == 0 and model.proj.weight.untyped_storage().nbytes() == 0
    # float32 proj (4 B/weight) became int8 + scales (bf16, and float32 for loom's kernel); the tied head
    # added an int8 copy.
    assert weight_bytes(model) == before - 384 * 128 * 4 + (384 + 256) * (128 + 2 + 4)


def test_process_linears_names_the_layer_it_cannot_quantize():
    model = torch.nn.Module()
    model.odd = Linear(100, 32)
    with pytest.raises(InvalidRequest, match="odd.*multiple of 64") as e:
        process_linears(model, Int4(64))
    assert e.value.param == "quantization"


def test_float_method_is_plain_f_linear_on_this_cpu_or_prepacked():
    cpu = torch.device("cpu")
    assert linear_method(None, 128, torch.float32, cpu) is UNQUANTIZED
    bf16 = linear_method(None, 128, torch.bfloat16, cpu)
    # bf16: prepacked for oneDNN where the CPU has native bf16, else computed in float32 (by loom's
    # kernels where they build)
    if can_prepack(torch.bfloat16, cpu):
        assert isinstance(bf16, OneDNNPrepacked)
    else:
        assert isinstance(bf16, Bf16Widened if kernels.available() else Float32Compute)
    assert linear_method(None, 128, torch.bfloat16, torch.device("meta")) is UNQUANTIZED
    assert isinstance(linear_method("int8", 128, torch.bfloat16, cpu), Int8)
    int4 = linear_method("int4", 64, torch.float32, cpu)
    assert isinstance(int4, Int4) and int4.group_size == 64


@pytest.mark.parametrize(
    "quantization,dtype,device,match",
    [
        ("int8", torch.float32, "cuda", "CPU only"),
        ("int4", torch.bfloat16, "cuda:1", "CPU only"),
        ("int8", torch.float16, "cpu", "float32 or bfloat16"),
        ("int3", torch.float32, "cpu", "one of"),
    ],
)
def test_unsupported_quantization_is_a_clear_error(quantization, dtype, device, match):
    with pytest.raises(InvalidRequest, match=match) as e:
        check_supported(quantization, dtype, torch.device(device))
    assert e.value.param == "quantization"


def test_bad_group_size_for_a_method_is_a_clear_error():
    with pytest.raises(InvalidRequest, match="one of") as e:
        linear_method("int4", 256, torch.float32, torch.device("cpu"))
    assert e.value.param == "quantization_group_size"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bfloat16_computed_in_float32_matches_the_bf16_linear(shape):
    """Float32Compute (bf16 on CPUs without native bf16) is a bf16 GEMM with float32 accumulation: equal to
    bf16 F.linear but for summation order, and holding float32 weights (twice the bytes) instead."""
    out_f, in_f = shape
    layer, twin, weight, bias = pair(Float32Compute(), out_f, in_f, torch.bfloat16)
    assert layer.weight.numel() == 0 and layer.weight_fp32.dtype == torch.float32
    assert torch.equal(layer.weight_fp32, weight.float())  # widening a bf16 value is exact
    gen = torch.Generator().manual_seed(1)
    for rows in ROWS:
        x = torch.randn(rows, in_f, generator=gen).to(torch.bfloat16)
        ours = layer(x)
        assert ours.dtype == torch.bfloat16 and ours.shape == (rows, out_f)
        assert_kernel_matches_twin(ours, twin(x), bias)
