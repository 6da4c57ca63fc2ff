"""`loom make-tiny --arch glm4v`: HF loads it as a GLM-4.1V checkpoint, its tokenizer has GLM's special
tokens where the config says, its chat template is GLM-4.1V's, and it is deterministic for a seed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Glm4vForConditionalGeneration

from loom.models import glm4v_tiny, tiny
from loom.tokenizer import Tokenizer


def test_hf_loads_it(tiny_model_dir):
    model_dir = tiny_model_dir("glm4v")
    model = Glm4vForConditionalGeneration.from_pretrained(model_dir, local_files_only=True)
    assert model.dtype == torch.float32
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    assert config.model_type == "glm4v" and config.vision_config.depth == 2
    assert config.text_config.rope_parameters["mrope_section"] == glm4v_tiny.MROPE_SECTION
    assert config.text_config.rope_parameters["partial_rotary_factor"] == 0.5
    processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    assert (processor.size.shortest_edge, processor.size.longest_edge) == (12544, 9633792)
    assert (processor.patch_size, processor.temporal_patch_size, processor.merge_size) == (14, 2, 2)
    # HF's init zeroes biases and sets norms to 1; ours are random so a loader that drops one fails parity.
    params = dict(model.named_parameters())
    assert params["model.visual.blocks.0.attn.qkv.weight"].std() > 0.1
    assert params["model.visual.patch_embed.proj.bias"].abs().sum() > 0
    assert not torch.all(params["model.visual.blocks.0.norm1.weight"] == 1)


def test_tokenizer_layout_matches_the_config(tiny_model_dir):
    model_dir = tiny_model_dir("glm4v")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    config = json.loads((model_dir / "config.json").read_text())
    assert len(tok) == config["text_config"]["vocab_size"] == glm4v_tiny.VOCAB_SIZE
    specials = glm4v_tiny.SPECIAL_TOKENS + glm4v_tiny.MARKUP_TOKENS
    ids = tok.convert_tokens_to_ids(specials)
    # GLM's layout: the added tokens follow the ordinary ones, in GLM's order, at the end of the vocabulary.
    assert ids == list(range(len(tok) - len(specials), len(tok)))
    for key, token in [
        ("image_token_id", "<|image|>"),
        ("video_token_id", "<|video|>"),
        ("image_start_token_id", "<|begin_of_image|>"),
        ("image_end_token_id", "<|end_of_image|>"),
        ("video_start_token_id", "<|begin_of_video|>"),
        ("video_end_token_id", "<|end_of_video|>"),
    ]:
        assert config[key] == tok.convert_tokens_to_ids(token), key
    # As in GLM-4.1V: <|image|> is 14 after <|endoftext|> (151343 - 151329).
    assert config["image_token_id"] - tok.convert_tokens_to_ids("<|endoftext|>") == 14
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.convert_tokens_to_ids(
        ["<|endoftext|>", "<|user|>", "<|observation|>"]
    )
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    # Specials are single tokens; the role and image markers go with skip_special_tokens, <think> stays.
    text = "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>hi<|assistant|><think>x</think>"
    encoded = tok.encode(text)
    assert tok.convert_tokens_to_ids("<|image|>") in encoded and len(encoded) < 16
    assert tok.decode(encoded, skip_special_tokens=True) == "\nhi<think>x</think>"


def test_chat_template_is_glm41v(tiny_model_dir):
    model_dir = tiny_model_dir("glm4v")
    assert (
        hashlib.sha256(json.dumps(glm4v_tiny.CHAT_TEMPLATE).encode()).hexdigest()
        == glm4v_tiny.CHAT_TEMPLATE_SHA256
    )
    assert (model_dir / "chat_template.jinja").read_text() == glm4v_tiny.CHAT_TEMPLATE
    # The frontend hands the template `{"type": "image"}` parts, as vLLM does: the official template
    # matches `type == 'image'` or an `image` key, and silently drops OpenAI's `image_url` parts.
    image_part = {"type": "image"}
    messages = [
        {"role": "system", "content": "You are a phone agent."},
        {"role": "user", "content": [image_part, {"type": "text", "text": "Tap OK"}]},
        {"role": "assistant", "content": "do(action=Tap)"},
        {"role": "user", "content": [{"type": "text", "text": "Next"}]},
    ]
    hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    loom_tok = Tokenizer(model_dir)
    assert loom_tok.apply_chat_template(messages) == expected
    assert expected == (
        "[gMASK]<sop><|system|>\nYou are a phone agent.<|user|>\n"
        "<|begin_of_image|><|image|><|end_of_image|>Tap OK<|assistant|>\ndo(action=Tap)<|user|>\nNext<|assistant|>\n"
    )
    messages[1]["content"][0] = {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
    assert "<|image|>" not in loom_tok.apply_chat_template(messages)


def test_cli_and_api_same_seed_same_bytes(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "loom.entrypoints.cli", "--log-level", "WARNING", "make-tiny"]
        + ["--arch", "glm4v", "--seed", "1", "--out", str(tmp_path / "a")],
        check=True,
        capture_output=True,
    )
    b = tiny.make_tiny(tmp_path / "b", arch="glm4v", seed=1)
    names = [p.name for p in (tmp_path / "a").iterdir()]
    assert {
        "model.safetensors",
        "preprocessor_config.json",
        "chat_template.jinja",
        ".loom-tiny-version",
    } <= set(names)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (b / name).read_bytes(), name
