"""GLM-4.1V configs and checkpoints: the nested config read into ModelConfig, and real checkpoint layouts
(current names, the older un-nested names, sharded) loading through the one loader."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from loom.errors import ModelLoadError
from loom.models.config import ModelConfig
from loom.models.glm4v import Glm4vForConditionalGeneration
from loom.models.loader import load_model


def _weights(model_dir) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_config_reads_text_and_vision_config(tiny_model_dir):
    model_dir = tiny_model_dir("glm4v")
    cfg = ModelConfig.from_dir(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert cfg.architecture == "Glm4vForConditionalGeneration"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (2048, 128, 2)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim) == (4, 2, 32, 16)
    assert cfg.mrope_section == (2, 3, 3) and cfg.rope_scaling is None and cfg.attention_bias
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image|>")
    assert cfg.image_start_token_id == tok.convert_tokens_to_ids("<|begin_of_image|>")
    assert cfg.image_end_token_id == tok.convert_tokens_to_ids("<|end_of_image|>")
    assert set(cfg.eos_token_ids) == set(
        tok.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    )
    v = cfg.vision
    assert (v.depth, v.hidden_size, v.num_heads, v.out_hidden_size, v.intermediate_size) == (
        2,
        64,
        4,
        128,
        256,
    )
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.image_size) == (14, 2, 2, 336)
    assert Glm4vForConditionalGeneration.supports_images and Glm4vForConditionalGeneration.uses_mrope


def test_config_defaults_follow_transformers():
    """A 5.x-style file that leaves things out gets transformers' values: full rotary, M-RoPE bands
    [8, 12, 12], q/k/v biases and head_dim = hidden / heads whatever the file says."""
    d = {
        "architectures": ["Glm4vForConditionalGeneration"],
        "model_type": "glm4v",
        "image_token_id": 151343,
        "text_config": {
            "vocab_size": 151552,
            "hidden_size": 4096,
            "intermediate_size": 13696,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "vision_config": {"depth": 24},
    }
    cfg = ModelConfig.from_dict(d)
    assert cfg.mrope_section == (8, 12, 12) and cfg.partial_rotary_factor == 1.0
    assert cfg.head_dim == 128 and cfg.attention_bias and cfg.vision.hidden_size == 1536
    # transformers 4.x wrote M-RoPE as a rope type: it is the default frequency schedule.
    d["text_config"]["rope_scaling"] = {"type": "mrope", "mrope_section": [16, 24, 24]}
    d["text_config"]["partial_rotary_factor"] = 0.5
    cfg = ModelConfig.from_dict(d)
    assert cfg.mrope_section == (16, 24, 24) and cfg.rope_scaling is None and cfg.rotary_dim == 64


def test_older_checkpoint_layout_sharded_loads_the_same(tiny_model_dir, tmp_path):
    """Checkpoints written before the decoder was nested (`model.layers.*`, `visual.*`), in several shards
    with an index, load into the same parameters."""
    model_dir = tiny_model_dir("glm4v")
    weights = _weights(model_dir)

    def old_name(name: str) -> str:
        if name.startswith("model.language_model."):
            return "model." + name[len("model.language_model.") :]
        if name.startswith("model.visual."):
            return name[len("model.") :]
        return name

    old = tmp_path / "old"
    shutil.copytree(model_dir, old, ignore=shutil.ignore_patterns("*.safetensors"))
    names = sorted(weights)
    shards = [names[i::3] for i in range(3)]
    weight_map = {}
    for k, part in enumerate(shards):
        file = f"model-{k + 1:05d}-of-00003.safetensors"
        save_file({old_name(n): weights[n].contiguous() for n in part}, old / file)
        weight_map.update({old_name(n): file for n in part})
    (old / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert any(n.startswith("visual.") for n in weight_map) and any(
        n.startswith("model.layers.") for n in weight_map
    )

    a = load_model(model_dir, torch.float32, torch.device("cpu"))
    b = load_model(old, torch.float32, torch.device("cpu"))
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # Packed on load: the checkpoint's separate q/k/v and vision gate/up land in our packed matrices.
    assert "model.language_model.layers.0.self_attn.qkv_proj.weight" in pa
    assert (
        "model.visual.blocks.0.mlp.gate_up_proj.weight" in pa
        and "model.visual.merger.gate_up_proj.weight" in pa
    )
    q = weights["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(pa["model.language_model.layers.0.self_attn.qkv_proj.weight"][: q.shape[0]], q)


def test_missing_vision_tensor_is_named(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("glm4v")
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = _weights(model_dir)
    del weights["model.visual.merger.up_proj.weight"]
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"shards \['1'\] of model.visual.merger.gate_up_proj.weight"):
        load_model(broken, torch.float32, torch.device("cpu"))


def test_bfloat16_runs_close_to_float32(tiny_model_dir):
    model_dir = tiny_model_dir("glm4v")
    f32 = load_model(model_dir, torch.float32, torch.device("cpu"))
    bf16 = load_model(model_dir, torch.bfloat16, torch.device("cpu"))
    torch.manual_seed(0)
    pixels = torch.randn(4 * 6, 3 * 2 * 14 * 14)
    with torch.inference_mode():
        a = f32.embed_images(pixels, [(1, 4, 6)])[0]
        b = bf16.embed_images(pixels, [(1, 4, 6)])[0]
    assert b.dtype == torch.bfloat16 and a.shape == b.shape == (6, 128)
    assert (a - b.float()).abs().max() < 0.05 * a.abs().max()
