"""The built-in tiny checkpoints: HF loads them as-is, they are deterministic, and greedy decoding is lively."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from loom.models import tiny

ARCHS = ["llama", "qwen2", "glm", "glm4"]
PROMPT = "The river ran low that summer, and the people of the valley walked to count the stones."


def _weights(model_dir) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_loads_and_runs(tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [tiny.ARCHS[arch]]
    assert config["vocab_size"] == 2048
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (128, 4, 32)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["tie_word_embeddings"] is (arch == "llama")
    assert config["torch_dtype"] == "float32"

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    assert model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 2048)
    assert torch.isfinite(logits).all()

    weights = _weights(model_dir)
    if arch == "llama":
        assert "lm_head.weight" not in weights
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    if arch != "llama":
        # HF would init biases to zero; ours are random so a loader that drops them fails parity.
        assert weights["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0
    if arch in ("glm", "glm4"):
        assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    norm = weights["model.layers.0.input_layernorm.weight"]
    assert not torch.all(norm == 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_is_not_degenerate(tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = tok(PROMPT, return_tensors="pt").input_ids[:, :20]
    with torch.no_grad():
        out = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=32,
            min_new_tokens=32,
            output_scores=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, ids.shape[1] :].tolist()
    assert len(set(new)) >= 6, new
    gaps = [torch.topk(s[0], 2).values for s in out.scores]
    gaps = sorted((g[0] - g[1]).item() for g in gaps)
    assert gaps[len(gaps) // 2] > 0.05  # median top-1/top-2 gap: no float32 near-ties in general


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = tiny.make_tiny(tmp_path / "a", arch="qwen2", seed=1)
    b = tiny.make_tiny(tmp_path / "b", arch="qwen2", seed=1)
    c = tiny.make_tiny(tmp_path / "c", arch="qwen2", seed=2)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    wa, wc = _weights(a), _weights(c)
    assert wa.keys() == wc.keys()
    assert not torch.equal(wa["model.layers.0.mlp.up_proj.weight"], wc["model.layers.0.mlp.up_proj.weight"])
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_caller_rng_state_is_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.make_tiny(tmp_path / "m", arch="llama", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_sharded_save_loads_the_same_weights(tmp_path, tiny_model_dir):
    sharded = tiny.make_tiny(tmp_path / "sharded", arch="glm", seed=0, max_shard_size="1MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((sharded / s).is_file() for s in shards)
    whole = _weights(tiny_model_dir("glm"))
    parts = _weights(sharded)
    assert parts.keys() == whole.keys()
    assert all(torch.equal(parts[k], whole[k]) for k in whole)
    model = AutoModelForCausalLM.from_pretrained(sharded, local_files_only=True)
    assert torch.equal(model.model.embed_tokens.weight, whole["model.embed_tokens.weight"])


def test_tokenizer_and_generation_config(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir, local_files_only=True)
    assert len(tok) == 2048
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    generation = json.loads((tiny_llama_dir / "generation_config.json").read_text())
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert set(generation["eos_token_id"]) == set(config["eos_token_id"]) == {im_end, eot}
    assert tok.pad_token_id == eot and tok.bos_token is None
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # no BOS added
    # The tool-call markers are single, non-special tokens, so skip_special_tokens keeps them.
    ids = tok.encode("<tool_call>x</tool_call>")
    assert len(ids) == 3 and tok.decode(ids, skip_special_tokens=True) == "<tool_call>x</tool_call>"
    assert "chat_template" in json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())


def test_small_size_parameter_count():
    # Counted on the meta device: building 89M real parameters would take seconds.
    config = tiny._model_config("glm4", "small", eos_ids=[2, 0], pad_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert 85e6 <= count <= 92e6, count
    assert not config.tie_word_embeddings


def test_bad_arch_or_size(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        tiny.make_tiny(tmp_path / "x", arch="gpt2")
    with pytest.raises(ValueError, match="size"):
        tiny.make_tiny(tmp_path / "x", size="huge")


def test_default_model_dir_is_cached_and_race_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(tiny.default_model_dir("llama"))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = tmp_path / "loom" / "tiny-llama-tiny"
    assert results == [expected, expected]
    weights = (expected / "model.safetensors").stat().st_mtime_ns
    assert tiny.default_model_dir("llama") == expected
    assert (expected / "model.safetensors").stat().st_mtime_ns == weights  # not rebuilt
    # No temp dirs left behind by the loser of the race.
    assert [p.name for p in (tmp_path / "loom").iterdir()] == ["tiny-llama-tiny"]
    AutoModelForCausalLM.from_pretrained(expected, local_files_only=True)


def test_publish_keeps_the_winner_unless_overwriting(tmp_path):
    def build(name: str, content: str):
        d = tmp_path / name
        d.mkdir()
        (d / "f").write_text(content)
        return d

    out = tmp_path / "out"
    tiny._publish(build("t1", "first"), out, overwrite=False)
    tiny._publish(build("t2", "second"), out, overwrite=False)
    assert (out / "f").read_text() == "first" and not (tmp_path / "t2").exists()
    (out / tiny._VERSION_FILE).write_text("1")  # only a tiny model may be replaced
    tiny._publish(build("t3", "third"), out, overwrite=True)
    assert (out / "f").read_text() == "third"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old model went with the trash


def test_make_tiny_replaces_a_model_but_not_other_dirs(tmp_path):
    out = tiny.make_tiny(tmp_path / "m", arch="llama", seed=1)
    tiny.make_tiny(out, arch="qwen2", seed=1)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        tiny.make_tiny(precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "precious"]  # no temp dirs left
