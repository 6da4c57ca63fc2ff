"""GPTQ and AWQ int4 checkpoints (loom/layers/quant/checkpoint.py): written here from the tiny models' float
weights by packers of our own, following each format's published layout, then loaded by loom.

The loaded int4 values must be the checkpoint's exactly (q as shipped; scale and zero as the bf16 roundings
of s and (8 - z) s), and the model's log-probabilities must stay near HF transformers' on the same weights
dequantized to float32 (the remaining difference: loom's int4 kernel quantizes activations to int8 per 32
values, and the bf16 scales)."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Glm4vForConditionalGeneration

from loom import LLM, SamplingParams
from loom.errors import InvalidRequest, ModelLoadError
from loom.kernels import cpu
from loom.layers.linear import Linear
from loom.layers.quant.checkpoint import CheckpointQuantization
from loom.layers.quant.int4 import dequantize_int4
from loom.models.loader import load_model

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
# The projections the writer quantizes (GLM-4's checkpoints ship gate_up_proj whole; the rest stay float
# and loom quantizes them at load).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")
MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FORMATS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "desc_act": False, "sym": False, "checkpoint_format": "gptq"},
    "gptq_v2": {"quant_method": "gptq", "bits": 4, "desc_act": False, "checkpoint_format": "gptq_v2"},
    "awq": {"quant_method": "awq", "bits": 4, "zero_point": True, "version": "gemm"},
}
# Mean |prompt log-probability - HF's on the dequantized weights|: measured 0.047-0.082 on the tiny models
# (qwen2 0.082 in each format, llama 0.072, glm4 0.073, glm4v 0.047), nearly all of it from what any
# quantized loom model adds: the int8 lm_head (lm_head_method) and int4's int8 activations.
HF_LOGPROB_MEAN_ERROR = 0.15


def rtn(w: torch.Tensor, group: int):
    """Asymmetric round-to-nearest 4-bit quantization as these checkpoints store it: q [out, in] and z
    [out, groups] integers in 0..15, s [out, groups] fp16, w ~= (q - z) * s."""
    out, inp = w.shape
    g = w.float().reshape(out, inp // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    s = ((hi - lo) / 15).clamp(min=1e-6).half()
    z = torch.round(-lo / s.float()).clamp(0, 15)
    q = torch.round(g / s.float()[..., None] + z[..., None]).clamp(0, 15)
    return q.reshape(out, inp).int(), z.int(), s


def pack(v: torch.Tensor, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """Eight consecutive values along `dim` (0..15) per int32, value j (or order[j]) in nibble j."""
    v = v.movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, 8).long()
    if order is not None:
        v = v[..., order]
    packed = sum((v[..., j] & 0xF) << (4 * j) for j in range(8))
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # as int32 bits
    return packed.to(torch.int32).movedim(-1, dim).contiguous()


def checkpoint_tensors(fmt: str, q, z, s, group: int) -> dict[str, torch.Tensor]:
    if fmt.startswith("gptq"):
        stored_z = z.t() - (1 if fmt == "gptq" else 0)
        return {
            "qweight": pack(q.t(), 0),  # [in / 8, out]
            "qzeros": pack(stored_z, 1),  # [groups, out / 8]
            "scales": s.t().contiguous(),
            "g_idx": torch.arange(q.shape[1], dtype=torch.int32) // group,
        }
    return {
        "qweight": pack(q.t(), 1, AWQ_ORDER),
        "qzeros": pack(z.t(), 1, AWQ_ORDER),
        "scales": s.t().contiguous(),
    }


def expected(q, z, s):
    """The values loom's int4 must hold: (q, bf16(s), bf16((8 - z) s))."""
    return q.to(torch.uint8), s.float().bfloat16(), ((8 - z.float()) * s.float()).bfloat16()


def write_quantized(src, dst, fmt: str, group: int, also: tuple[str, ...] = ()):
    """A copy of the float checkpoint `src` with every decoder projection (and the modules `also`)
    quantized in `fmt`; and the values expected per projection; and a float32 checkpoint of the
    dequantized weights (for HF)."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    quantized, values, dequantized = {}, {}, dict(tensors)
    for name, w in tensors.items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module.split(".")[-1] in PROJECTIONS + also):
            quantized[name] = w
            continue
        q, z, s = rtn(w, group)
        for suffix, t in checkpoint_tensors(fmt, q, z, s, group).items():
            quantized[f"{module}.{suffix}"] = t
        values[module] = expected(q, z, s)
        dequantized[name] = (
            (q - z.repeat_interleave(group, 1)) * s.float().repeat_interleave(group, 1)
        ).float()
    (dst / "model.safetensors").unlink()
    save_file(quantized, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {**FORMATS[fmt], "group_size": group}
    (dst / "config.json").write_text(json.dumps(config))
    float_dir = dst.parent / f"{dst.name}-dequantized"
    shutil.copytree(src, float_dir)
    save_file({k: v.float().contiguous() for k, v in dequantized.items()}, float_dir / "model.safetensors")
    return values, float_dir


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_decode_gives_the_checkpoints_values(fmt):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 256, generator=gen) * 0.1
    q, z, s = rtn(w, 64)
    z[0, 0], z[1, 1] = 0, 15  # the zero-point edges (GPTQ's original format stores z - 1: -1 for 0)
    fmt_cfg = CheckpointQuantization.from_config({**FORMATS[fmt], "group_size": 64})
    got = fmt_cfg.decode(checkpoint_tensors(fmt, q, z, s, 64), "layer")
    want = expected(q, z, s)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # the weight moves by at most the bf16 roundings of s and (8 - z) s: 2^-8 (|q - 8| + |8 - z|) s
    zz, step = z.repeat_interleave(64, 1), s.float().repeat_interleave(64, 1)
    exact = (q - zz) * step
    bound = ((q - 8).abs() + (8 - zz).abs()) * step * 2**-8 + exact.abs() * 2**-23
    assert ((dequantize_int4(*got) - exact).abs() <= bound).all()


@pytest.mark.parametrize(
    "arch, fmt",
    # qwen2: q/k/v biases stay float beside the quantized weights; glm4v: Open-AutoGLM's architecture
    [
        ("qwen2", "gptq"),
        ("qwen2", "gptq_v2"),
        ("qwen2", "awq"),
        ("llama", "awq"),
        ("glm4", "gptq"),
        ("glm4v", "gptq"),
    ],
)
def test_quantized_checkpoint_loads_its_values_and_runs_near_hf(arch, fmt, tiny_model_dir, tmp_path):
    src = tiny_model_dir(arch)
    values, float_dir = write_quantized(src, tmp_path / fmt, fmt, 32)

    # The twin holds the values unpacked: exactly the checkpoint's, q/k/v and gate/up packed together.
    twin = load_model(tmp_path / fmt, torch.float32, torch.device("cpu"), reference=True)
    llm = LLM(str(tmp_path / fmt), dtype="float32", num_blocks=64)
    model = llm.engine.runner.model
    checked = set()
    for name, layer in twin.named_modules():
        if not isinstance(layer, Linear) or name == "lm_head":
            continue
        assert layer.method.name == "int4-reference"
        parent, base = name.rsplit(".", 1)
        parts = [name] if name in values else [f"{parent}.{p}" for p in MERGED.get(base, ())]
        if not parts or any(p not in values for p in parts):
            continue  # float in the checkpoint (a vision tower's attention): quantized at load
        checked.update(parts)
        want = [torch.cat(t) for t in zip(*(values[p] for p in parts), strict=True)]
        assert torch.equal(layer.qvalues, want[0]), name
        assert torch.equal(layer.scales, want[1]) and torch.equal(layer.zeros, want[2]), name
        ours = model.get_submodule(name)
        if ours.loom_kernel:  # the engine's layer, packed for loom's kernel: the same values
            packed = cpu.unpack_int4(ours.qweight, ours.scales, ours.zeros, ours.out_features)
            assert all(torch.equal(a, b) for a, b in zip(packed, want, strict=True)), name

    assert checked == set(values)  # every quantized tensor the checkpoint has, found where it belongs
    assert {m.method.name for n, m in model.named_modules() if isinstance(m, Linear) and n != "lm_head"} == {
        "int4"
    }
    rng = random.Random(0)
    vocab = llm.engine.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (9, 40, 77)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    hf_class = Glm4vForConditionalGeneration if arch == "glm4v" else AutoModelForCausalLM
    hf = hf_class.from_pretrained(float_dir, dtype=torch.float32).eval()
    errors = []
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = torch.log_softmax(hf(input_ids=torch.tensor([prompt])).logits[0].float(), -1)
        errors += [
            abs(out.prompt_logprobs[i][prompt[i]] - ref[i - 1, prompt[i]].item())
            for i in range(1, len(prompt))
        ]
    mean = sum(errors) / len(errors)
    assert mean < HF_LOGPROB_MEAN_ERROR, mean


def test_unsupported_checkpoints_are_refused(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    for qc, match in (
        ({"quant_method": "gptq", "bits": 8, "group_size": 32}, "8-bit"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True}, "act-order"),
        ({"quant_method": "gptq", "bits": 4, "group_size": -1}, "group_size"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "GEMM"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method"),
    ):
        with pytest.raises(ModelLoadError, match=match):
            CheckpointQuantization.from_config(qc)
    values, _ = write_quantized(src, tmp_path / "gptq", "gptq", 32)
    with pytest.raises(InvalidRequest, match="cannot re-quantize") as e:
        load_model(tmp_path / "gptq", torch.float32, torch.device("cpu"), quantization="int8")
    assert e.value.param == "quantization"
    # act-order's g_idx in a checkpoint that says desc_act false
    original = load_file(tmp_path / "gptq" / "model.safetensors")
    tensors = dict(original)
    name = next(n for n in tensors if n.endswith("g_idx"))
    tensors[name] = tensors[name].flip(0)
    save_file(tensors, tmp_path / "gptq" / "model.safetensors")
    with pytest.raises(ModelLoadError, match="act-order"):
        load_model(tmp_path / "gptq", torch.float32, torch.device("cpu"))
    # a projection 8 output channels short of the model's (consistent with itself)
    tensors = dict(original)
    o = "model.layers.0.self_attn.o_proj"
    tensors[f"{o}.qweight"] = tensors[f"{o}.qweight"][:, :-8].contiguous()
    tensors[f"{o}.scales"] = tensors[f"{o}.scales"][:, :-8].contiguous()
    tensors[f"{o}.qzeros"] = tensors[f"{o}.qzeros"][:, :-1].contiguous()
    save_file(tensors, tmp_path / "gptq" / "model.safetensors")
    with pytest.raises(ModelLoadError, match="do not match the model's"):
        load_model(tmp_path / "gptq", torch.float32, torch.device("cpu"))


def test_a_quantized_lm_head_is_dequantized_for_its_int8_method(tiny_model_dir, tmp_path):
    """The loader leaves a quantized layer's float weight unwritten; lm_head's int8 method quantizes from
    the float weight, so it is filled from the checkpoint's values first."""
    values, float_dir = write_quantized(
        tiny_model_dir("qwen2"), tmp_path / "q", "gptq", 32, also=("lm_head",)
    )
    assert "lm_head" in values
    llm = LLM(str(tmp_path / "q"), dtype="float32", num_blocks=64)
    assert llm.engine.runner.model.lm_head.method.name == "int8"
    prompt = list(range(3, 60))
    out = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )
    hf = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(input_ids=torch.tensor([prompt])).logits[0].float(), -1)
    errors = [
        abs(out[0].prompt_logprobs[i][prompt[i]] - ref[i - 1, prompt[i]].item())
        for i in range(1, len(prompt))
    ]
    assert sum(errors) / len(errors) < HF_LOGPROB_MEAN_ERROR
