"""loom's own CPU GEMV kernels (gemv.c) and the linear methods that use them, against plain PyTorch.

The kernels accumulate in float32 in their own order, so they are held to float32 rounding of the sum
of |x| |w| against a float64 product; the methods to their twins as every method is
(test_quant_methods.assert_kernel_matches_twin), on both sides of the row limits where they switch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loom.kernels import build, cpu
from loom.layers.quant import Bf16Widened, Int4, Int8, linear_method
from loom.layers.quant.int4 import dequantize_int4, quantize_activations, quantize_int4
from loom.layers.quant.int8 import dequantize_int8, quantize_int8
from tests.layers.quant.test_quant_methods import assert_kernel_matches_twin, pair


def _cpu_can() -> bool:
    flags = set(
        re.findall(
            r"\w+",
            next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), ""),
        )
    )
    return {"avx2", "fma"} <= flags and build.compiler() is not None


def test_kernels_build_and_load_on_this_machine():
    """Every machine we run on (x86 with AVX2, a C compiler) must get the kernels: a silent fallback
    would hide a broken build behind torch's slower path."""
    if not _cpu_can():
        pytest.fail("this machine lacks AVX2/FMA or a C compiler; the suite expects both")
    assert cpu.available()
    assert list(build.kernel_dir().glob("loom-cpu-*.so"))


def close_to_float64(ours: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    exact = x.double() @ w.double().t()
    bound = (x.double().abs() @ w.double().abs().t()) * 2**-20 + 1e-30
    assert ours.dtype == torch.float32 and ours.shape == exact.shape
    assert ((ours.double() - exact).abs() <= bound).all()


def panels(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    return cpu.pack_panels(w), w.shape[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8], ids=str)
def test_panels_hold_the_weight(dtype):
    gen = torch.Generator().manual_seed(0)
    for n, k in ((1, 8), (16, 3), (37, 256), (203, 100)):
        w = torch.randn(n, k, generator=gen).mul(40).to(dtype)
        p = cpu.pack_panels(w)
        assert p.shape == (-(-n // 16), k, 16) and p.dtype == dtype
        assert torch.equal(cpu.unpack_panels(p, n), w)
        assert not cpu.unpack_panels(p, 16 * p.shape[0])[n:].any()  # the last panel is padded with zeros


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 64])
@pytest.mark.parametrize("shape", [(1, 8), (3, 136), (5, 768), (37, 256), (1000, 64), (17, 100)], ids=str)
def test_bf16_and_int8_kernels_compute_the_product(rows, shape):
    n, k = shape
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(n, k, generator=gen).bfloat16()
    close_to_float64(cpu.matmul(x, *panels(w)), x, w.float())
    q, scale = quantize_int8(F.pad(w.float(), (0, -k % 8)))  # quantize_int8 takes multiples of 8
    q = q[:, :k].contiguous()
    close_to_float64(cpu.matmul(x, *panels(q), scale.float()), x, dequantize_int8(q, scale))
    # bf16 in and out: the float32 result rounded to nearest even, as torch rounds
    xb = x.bfloat16()
    bias = torch.randn(n, generator=gen)
    expected = cpu.matmul(xb.float(), *panels(w), bias=bias).bfloat16()
    assert torch.equal(cpu.matmul(xb, *panels(w), bias=bias), expected)
    # int8's arithmetic on a float32 x: x rounded to bf16 values, the result too
    via = cpu.matmul(x, *panels(q), scale.float(), via_bf16=True)
    assert via.dtype == torch.float32
    assert torch.equal(via, cpu.matmul(x.bfloat16().float(), *panels(q), scale.float()).bfloat16().float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8], ids=str)
def test_a_row_gets_the_same_bits_in_any_batch(dtype):
    """Each output is one FMA chain over k, whatever the batch: one row alone (the decode path), the
    same row among 2, 5 or 6 (a tile), or 700 rows (chunks of rows past the cache) give the same bits.
    Speculative decoding's greedy output and the stack's prefill rows rely on it."""
    gen = torch.Generator().manual_seed(1)
    n, k = 203, 768
    w = torch.randn(n, k, generator=gen).mul(40).to(dtype)
    scale = torch.rand(n, generator=gen) if dtype == torch.int8 else None
    bias = torch.randn(n, generator=gen)
    x = torch.randn(700, k, generator=gen).bfloat16()
    whole = cpu.matmul(x, *panels(w), scale, bias)
    alone = torch.cat([cpu.matmul(x[i : i + 1], *panels(w), scale, bias) for i in range(0, 700, 97)])
    assert torch.equal(whole[::97], alone)
    for size in (2, 3, 5, 6, 13):
        parts = torch.cat([cpu.matmul(x[i : i + size], *panels(w), scale, bias) for i in range(0, 60, size)])
        assert torch.equal(parts, whole[: parts.shape[0]])


def test_kernels_give_the_same_bits_with_any_thread_count():
    """Each output is one thread's sum in a fixed order: the thread count must not change a bit (the
    engine's outputs may not depend on --num-threads)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(203, 512, generator=gen).bfloat16()
    threads = torch.get_num_threads()
    try:
        for rows in (1, 3, 40):
            x = torch.randn(rows, 512, generator=gen)
            outs = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                outs.append(cpu.matmul(x, *panels(w)))
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    finally:
        torch.set_num_threads(threads)


def test_kernels_refuse_what_they_cannot_read():
    x = torch.randn(2, 64)
    w = cpu.pack_panels(torch.randn(16, 64).bfloat16())
    with pytest.raises(ValueError, match="float32 or bf16 x"):
        cpu.matmul(x.double(), w, 16)
    with pytest.raises(ValueError, match="float32 or bf16 x"):
        cpu.matmul(torch.randn(64, 2).t(), w, 16)  # not contiguous
    with pytest.raises(ValueError, match="float32 or bf16 x"):
        cpu.matmul(torch.randn(2, 60), w, 16)  # K differs
    with pytest.raises(ValueError, match="in panels"):
        cpu.matmul(x, w.float(), 16)
    with pytest.raises(ValueError, match="in panels"):
        cpu.matmul(x, torch.randn(16, 64).bfloat16(), 16)  # not packed
    with pytest.raises(ValueError, match="in panels"):
        cpu.matmul(x, w, 17)  # 17 channels need two panels
    with pytest.raises(ValueError, match="pack_panels takes"):
        cpu.pack_panels(torch.randn(16, 64))
    q, scale = quantize_int8(torch.randn(16, 64))
    with pytest.raises(ValueError, match="scales"):
        cpu.matmul(x, *panels(q), scale)  # bfloat16 scales: the kernel reads float32
    with pytest.raises(ValueError, match="bias"):
        cpu.matmul(x, *panels(q), scale.float(), bias=torch.zeros(15))


# in_features 100 is not a multiple of 8: the panels take any width.
@pytest.mark.parametrize("rows", [1, 2, 4, 33, 200])
@pytest.mark.parametrize("shape", [(37, 256), (96, 100), (2, 768)], ids=str)
def test_bf16_widened_matches_the_bf16_linear(rows, shape):
    out_f, in_f = shape
    layer, twin, weight, bias = pair(Bf16Widened(), out_f, in_f, torch.bfloat16)
    assert (
        layer.weight.numel() == 0
    )  # the weight lives in its panels only: no float32 copy, no second bf16 one
    assert torch.equal(cpu.unpack_panels(layer.weight_panels, out_f), weight)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    ours = layer(x)
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, out_f)
    assert_kernel_matches_twin(ours, twin(x), bias)
    assert_kernel_matches_twin(ours, F.linear(x, weight, bias), bias)


@pytest.mark.parametrize("rows", [1, 3, 64, 65, 300])
def test_int8_matches_the_twin(rows):
    layer, twin, _, bias = pair(Int8(), 203, 256, torch.float32)
    assert torch.equal(cpu.unpack_panels(layer.qpanels, 203), twin.qweight)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    assert_kernel_matches_twin(layer(x), twin(x), bias)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_packing_and_dequantizing_are_exact(group_size):
    gen = torch.Generator().manual_seed(group_size)
    q, scale, zero = quantize_int4(torch.randn(37, 256, generator=gen), group_size)
    w, scales, zeros = cpu.pack_int4(q, scale, zero)
    assert w.shape == (5, 8, 128) and w.dtype == torch.uint8
    assert scales.shape == zeros.shape == (5, 256 // group_size, 8)
    # byte 32 j + 4 c + i of a block: channel c's value 4 j + i (low nibble) and 16 + 4 j + i (high)
    assert w[1, 2, 32 * 3 + 4 * 5 + 1].item() == q[13, 64 + 13].item() | q[13, 64 + 29].item() << 4
    # the padding channels 37-39: q 8, scale and zero 0 (outputs 0)
    assert (scales[4, :, 5:] == 0).all() and (zeros[4, :, 5:] == 0).all()
    back = cpu.unpack_int4(w, scales, zeros, 37)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, scale, zero), strict=True))


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 17, 40])
@pytest.mark.parametrize("shape, group_size", [((37, 256), 32), ((1000, 128), 64), ((5, 768), 128)], ids=str)
def test_int4_kernel_is_the_product_of_the_dequantized_operands(rows, shape, group_size):
    """The input quantized to int8 per 32 values (quantize_activations), times the dequantized weight:
    the integer dots are exact, so only float32 sums of the per-block and per-group terms differ from
    float64."""
    n, k = shape
    gen = torch.Generator().manual_seed(rows + n)
    q, scale, zero = quantize_int4(torch.randn(n, k, generator=gen), group_size)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    x[0, 32:64] = 0  # a block of zeros: scale 0, nothing divided by it
    w = dequantize_int4(q, scale, zero)
    xq = quantize_activations(x)
    packed = cpu.pack_int4(q, scale, zero)
    ours = cpu.matmul_int4(x.float(), *packed, group_size, n)
    exact = xq.double() @ w.double().t()
    bound = (xq.double().abs() @ w.double().abs().t()) * 2**-18 + 1e-30
    assert ((ours.double() - exact).abs() <= bound).all()
    # quantizing the input moves the product by about 0.5% of its norm (the step is 1/127 of a block's max)
    unquantized = x.double() @ w.double().t()
    assert ((ours.double() - unquantized).norm() / unquantized.norm()).item() < 0.02
    # bf16 in: the same, rounded once
    assert torch.equal(cpu.matmul_int4(x, *packed, group_size, n), ours.bfloat16())


def test_int4_kernel_gives_the_same_bits_with_any_thread_count_and_refuses_bad_input():
    gen = torch.Generator().manual_seed(0)
    q, scale, zero = quantize_int4(torch.randn(203, 256, generator=gen), 64)
    w, scales, zeros = cpu.pack_int4(q, scale, zero)
    threads = torch.get_num_threads()
    try:
        for rows in (3, 21):
            x = torch.randn(rows, 256, generator=gen)
            outs = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                outs.append(cpu.matmul_int4(x, w, scales, zeros, 64, 203))
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="group size"):
        cpu.matmul_int4(x, w, scales, zeros, 48, 203)
    with pytest.raises(ValueError, match="bf16 scales"):
        cpu.matmul_int4(x, w, scales.float(), zeros, 64, 203)
    with pytest.raises(ValueError, match="bf16 scales"):
        cpu.matmul_int4(x, w, scale, zero, 64, 203)  # not packed
    with pytest.raises(ValueError, match="float32 or bf16 x"):
        cpu.matmul_int4(x[:, :128], w, scales, zeros, 64, 203)
    with pytest.raises(ValueError, match="pack_int4"):
        cpu.matmul_int4(x, w, scales, zeros, 64, 300)


def test_an_int4_row_gets_the_same_bits_in_any_batch():
    """The int4 kernel runs every batch size (1 row up to a prefill chunk) through the same per-row sums:
    a row alone, in a partial tile of its 4 rows, or among 700 (chunks of rows past L2) gives the same
    bits."""
    gen = torch.Generator().manual_seed(2)
    n, k = 203, 768
    q, scale, zero = quantize_int4(torch.randn(n, k, generator=gen), 64)
    packed = cpu.pack_int4(q, scale, zero)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(700, k, generator=gen).bfloat16()
    whole = cpu.matmul_int4(x, *packed, 64, n, bias)
    alone = torch.cat([cpu.matmul_int4(x[i : i + 1], *packed, 64, n, bias) for i in range(0, 700, 97)])
    assert torch.equal(whole[::97], alone)
    for size in (2, 3, 5, 13):
        parts = torch.cat(
            [cpu.matmul_int4(x[i : i + size], *packed, 64, n, bias) for i in range(0, 60, size)]
        )
        assert torch.equal(parts, whole[: parts.shape[0]])


@pytest.mark.parametrize("rows", [1, 3, 16, 17])
def test_int4_kernel_matches_the_twin(rows):
    layer, twin, _, bias = pair(Int4(32), 203, 256, torch.bfloat16)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).bfloat16()
    assert_kernel_matches_twin(layer(x), twin(x), bias)


def test_without_the_kernels_bf16_falls_back_to_a_float32_copy():
    """LOOM_CPU_KERNELS=0 (as when no compiler is found): a fresh process picks Float32Compute for bf16
    on this CPU and torch's int8 and int4 kernels, and all still compute the product."""
    code = (
        "import torch\n"
        "from loom.kernels import cpu\n"
        "from loom.layers.quant import linear_method\n"
        "from loom.layers.linear import Linear\n"
        "from loom.layers.quant import process_linears, Int4, Int8\n"
        "assert not cpu.available()\n"
        "m = linear_method(None, 128, torch.bfloat16, torch.device('cpu'))\n"
        "print(m.name)\n"
        "layer = Linear(64, 8)\n"
        "torch.nn.init.normal_(layer.weight)\n"
        "w = layer.weight.detach().clone()\n"
        "process_linears(layer, Int8())\n"
        "x = torch.randn(3, 64)\n"
        "print(float((layer(x) - x @ w.t()).norm() / (x @ w.t()).norm()))\n"
        "layer4, twin = Linear(64, 8), Linear(64, 8)\n"
        "layer4.weight.data.copy_(w); twin.weight.data.copy_(w)\n"
        "process_linears(layer4, Int4(32)); process_linears(twin, Int4(32).reference())\n"
        "assert layer4.scales_zeros.dtype == torch.bfloat16\n"  # torch's packing
        "print(float((layer4(x) - twin(x)).norm() / twin(x).norm()))\n"
    )
    env = {**os.environ, "LOOM_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    name, err, int4_vs_twin = out.stdout.split()
    assert name == (
        "onednn-bf16"
        if linear_method(None, 128, torch.bfloat16, torch.device("cpu")).name == "onednn-bf16"
        else "bf16-in-fp32"
    )
    assert float(err) < 0.02
    # torch's int4 kernel takes unquantized activations, and so does the twin there
    assert float(int4_vs_twin) < 0.01


def test_a_failed_build_is_an_error_naming_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fake cc: no such option' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="fake cc: no such option"):
        build.build(str(fake))
    assert not list((tmp_path / "loom" / "kernels").glob("*"))  # no half-written library left behind
