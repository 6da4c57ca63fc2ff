"""The tiny random-weight GLM-4.1V checkpoint (`loom make-tiny --arch glm4v`), laid out as the real one:
`Glm4vForConditionalGeneration` weights (vision depth 2, a 2-layer text decoder), GLM's special tokens in
GLM's order after the ordinary ones (so every id the config names is the tokenizer's), GLM-4.1V's chat
template, its `preprocessor_config.json` and a generation config with its three EOS tokens.

The chat template is the official one of zai-org/GLM-4.1V-9B-Thinking (revision 3c1471e5), as recorded
verbatim in a public renderer-validation snapshot found through code search, with the sha256 of its JSON
encoding (CHAT_TEMPLATE_SHA256; tests/models/test_glm4v_tiny.py checks it). AutoGLM-Phone-9B is served with the same template in
Open-AutoGLM's instructions (vLLM with `--chat-template-content-format string`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The real tokenizer's added tokens from <|endoftext|> (151329) on. Ids 151329-151344 (through <|video|>)
# are GLM-4.1V's; the order after <|video|> follows the GLM-4.5 tokenizer (the 4.1V file was not
# available to check), which only matters for ids no config field names.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|begin_of_transcription|>",
    "<|end_of_transcription|>",
]
# Markup the model writes in its answers: single tokens, but kept by skip_special_tokens so reasoning
# and tool-call parsers see them.
MARKUP_TOKENS = [
    "<|code_prefix|>",
    "<|code_middle|>",
    "<|code_suffix|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "/nothink",
    "<|begin_of_box|>",
    "<|end_of_box|>",
]
VOCAB_SIZE = 2048
EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")

CHAT_TEMPLATE = """[gMASK]<sop>
{%- for msg in messages %}
    {%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
    {%- elif msg.role == 'user' %}
<|user|>{{ '\\n' }}

        {%- if msg.content is string %}
{{ msg.content }}
        {%- else %}
            {%- for item in msg.content %}
                {%- if item.type == 'video' or 'video' in item %}
<|begin_of_video|><|video|><|end_of_video|>
                {%- elif item.type == 'image' or 'image' in item %}
<|begin_of_image|><|image|><|end_of_image|>
                {%- elif item.type == 'text' %}
{{ item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- elif msg.role == 'assistant' %}
        {%- if msg.metadata %}
<|assistant|>{{ msg.metadata }}
{{ msg.content }}
        {%- else %}
<|assistant|>
{{ msg.content }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""
CHAT_TEMPLATE_SHA256 = "5232dbe7ee947df4d2009f2b262b70a22d4f2d2f0590e2af4ef2a78096171e90"
"""sha256 of json.dumps(CHAT_TEMPLATE), as the snapshot recorded the official template."""

# zai-org/GLM-4.1V-9B-Thinking's preprocessor_config.json (values as transformers' defaults confirm).
PREPROCESSOR_CONFIG = {
    "size": {"shortest_edge": 12544, "longest_edge": 9633792},
    "do_resize": True,
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_processor_type": "Glm4vImageProcessor",
    "processor_class": "Glm4vProcessor",
}

TEXT_SIZES = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
# head_dim 32, half of it rotary: 8 frequency bands, split (t, h, w) as the real [8, 12, 12] of 32.
MROPE_SECTION = [2, 3, 3]
VISION_SIZES = dict(
    depth=2,
    hidden_size=64,
    num_heads=4,
    intermediate_size=256,
    out_hidden_size=TEXT_SIZES["hidden_size"],
    patch_size=14,
    temporal_patch_size=2,
    spatial_merge_size=2,
    image_size=336,
    rms_norm_eps=1e-5,
)


def build_tokenizer():
    """The tiny byte-level BPE (trained on tiny.py's corpus) with GLM's added tokens appended in order."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from loom.models.tiny import byte_level_bpe, corpus_lines

    tok = byte_level_bpe(corpus_lines(), VOCAB_SIZE - len(SPECIAL_TOKENS) - len(MARKUP_TOKENS))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=TEXT_SIZES["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE,
    )


def _randomize_extras(model: torch.nn.Module, std: float) -> None:
    """Random biases and norm scales (HF makes them 0 and 1), so a loader that drops one fails parity."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, std)
            elif "norm" in name and name.endswith(".weight"):
                param.uniform_(0.8, 1.2)


def build(out_dir: Path, seed: int, initializer_range: float, max_shard_size: str | None) -> None:
    """Write the checkpoint into out_dir (an empty private directory; tiny.py publishes it)."""
    from transformers import GenerationConfig, Glm4vConfig, Glm4vForConditionalGeneration

    from loom.models.tiny import _update_json

    tokenizer = build_tokenizer()
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    _update_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "additional_special_tokens": SPECIAL_TOKENS[1:],
            "chat_template": CHAT_TEMPLATE,
            "bos_token": None,
        },
        drop=("extra_special_tokens",),  # a list here is 5.x-only; 4.x expects a dict
    )
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    eos_ids = [ids[t] for t in EOS_TOKENS]
    pad_id = ids["<|endoftext|>"]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    config = Glm4vConfig(
        text_config=dict(
            TEXT_SIZES,
            vocab_size=VOCAB_SIZE,
            rope_parameters=dict(rope, mrope_section=MROPE_SECTION),
            initializer_range=initializer_range,
            pad_token_id=pad_id,
        ),
        vision_config=dict(VISION_SIZES, initializer_range=initializer_range),
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
        tie_word_embeddings=False,
        architectures=["Glm4vForConditionalGeneration"],
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Glm4vForConditionalGeneration(config).to(torch.float32)
        _randomize_extras(model, initializer_range)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **save_kwargs)
    GenerationConfig(bos_token_id=None, eos_token_id=eos_ids, pad_token_id=pad_id).save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")

    # What transformers 4.x (and most engines) read from the decoder's config: rope fields at its top
    # level, M-RoPE as rope_scaling, the biases and EOS ids the 5.x config leaves implicit.
    raw = json.loads((out_dir / "config.json").read_text())
    raw["torch_dtype"] = "float32"
    raw["text_config"].update(
        rope_theta=rope["rope_theta"],
        partial_rotary_factor=rope["partial_rotary_factor"],
        rope_scaling={"rope_type": "default", "mrope_section": MROPE_SECTION},
        attention_bias=True,
        eos_token_id=eos_ids,
        torch_dtype="float32",
    )
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
