"""`loom bench throughput`: the offline comparison runs every system on the same workload, and its outputs
(table, JSON, PNG) say what was measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loom.bench import gguf, throughput
from loom.bench.throughput import make_workload


def test_every_system_produces_the_same_greedy_tokens(tiny_llama_dir: Path, tmp_path: Path, capsys):
    out_json, out_png = tmp_path / "t.json", tmp_path / "t.png"
    argv = ["--model", str(tiny_llama_dir), "--dtypes", "float32", "--num-requests", "5", "--threads", "1"]
    argv += ["--systems", "loom,hf-seq,hf-static,hf-cb", "--json", str(out_json), "--png", str(out_png)]
    assert throughput.main(argv) == 0

    result = json.loads(out_json.read_text())
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"loom", "hf-seq", "hf-static", "hf-cb"}
    reqs = make_workload("random", 5, 2048, 0, 4096)
    assert result["output_tokens"] == sum(r.output_len for r in reqs)
    for name, row in rows.items():
        assert row["seconds"] > 0 and row["output_tok_s"] > 0, name
        assert 0 < row["roofline_fraction"] < 1, name
        assert "wrong output length" not in row["note"], name
        if name != "hf-static":  # greedy float32: token-identical to HF
            assert "100% tokens agree with hf-static" in row["note"], (name, row["note"])
    assert rows["loom"]["steps"] > 0 and rows["hf-seq"]["steps"] == result["output_tokens"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| loom | float32 |" in table and "% of compute roofline" in table


def test_a_system_that_cannot_run_is_a_row_with_its_reason(tiny_llama_dir: Path, tmp_path: Path):
    out_json = tmp_path / "t.json"
    argv = ["--model", str(tiny_llama_dir), "--dtypes", "float32", "--num-requests", "2", "--threads", "1"]
    assert throughput.main(argv + ["--systems", "loom,llama.cpp", "--json", str(out_json)]) == 0
    rows = {r["system"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert rows["loom"]["seconds"] > 0
    assert rows["llama.cpp"]["seconds"] is None and "--gguf float32=PATH" in rows["llama.cpp"]["note"]


def test_bad_flags_are_refused(tiny_llama_dir: Path):
    with pytest.raises(SystemExit, match="unknown systems"):
        throughput.main(["--model", str(tiny_llama_dir), "--systems", "loom,vllm"])
    with pytest.raises(SystemExit, match="DTYPE=PATH"):
        throughput.main(["--model", str(tiny_llama_dir), "--gguf", "model.gguf"])


def test_workloads_are_seeded_and_fit_the_context():
    assert make_workload("random", 8, 100, 1, 4096) == make_workload("random", 8, 100, 1, 4096)
    assert make_workload("random", 8, 100, 1, 4096) != make_workload("random", 8, 100, 2, 4096)
    for r in make_workload("sharegpt-like", 200, 100, 0, 512):
        assert len(r.prompt) + r.output_len <= 512 and len(r.prompt) >= 1
    shared = make_workload("shared-prefix", 8, 100, 0, 4096)
    assert shared[0].prompt[:1024] == shared[4].prompt[:1024] != shared[1].prompt[:1024]
    assert all(min(r.prompt) >= 3 for r in shared)  # ids 0-2 are special tokens


def test_gguf_conversion_falls_back_to_the_default_pre_tokenizer(tmp_path: Path):
    """The bootstrap runs the converter with our model dir and flags, and turns its refusal of an
    unknown BPE pre-tokenizer into llama.cpp's default one. The stand-in converter has the real one's
    layout (convert_hf_to_gguf.py beside a `conversion` package)."""
    src = tmp_path / "llama.cpp"
    (src / "conversion").mkdir(parents=True)
    (src / "conversion" / "__init__.py").write_text("")
    (src / "conversion" / "base.py").write_text(
        "class TextModel:\n"
        "    def get_vocab_base_pre(self, tokenizer):\n"
        "        raise NotImplementedError('BPE pre-tokenizer was not recognized')\n"
    )
    (src / "convert_hf_to_gguf.py").write_text(
        "import sys\nfrom conversion.base import TextModel\n"
        "args = sys.argv[1:]\nout = args[args.index('--outfile') + 1]\n"
        "open(out, 'w').write(' '.join(args) + ' ' + TextModel().get_vocab_base_pre(None))\n"
    )
    model = tmp_path / "model"
    model.mkdir()
    out = gguf.convert(model, "bfloat16", src, out=tmp_path / "m.gguf")
    assert out.read_text() == f"{model} --outtype bf16 --outfile {tmp_path / 'm.partial'} default"
    with pytest.raises(gguf.GGUFError, match="no convert_hf_to_gguf.py"):
        gguf.convert(model, "float32", tmp_path, out=tmp_path / "n.gguf")


def test_hf_baselines_ignore_the_checkpoints_eos(tiny_llama_dir: Path, tmp_path: Path):
    """The checkpoint's generation_config names an EOS that greedy decoding produces early; HF must
    still generate every requested token, as loom does with ignore_eos."""
    import shutil

    import torch

    from loom.bench.systems import Request, _hf_generate, load_hf

    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    request = Request([5, 6, 7, 8, 9], 12)
    with torch.inference_mode():
        free = _hf_generate(load_hf(model_dir, "float32"), [request])[0][0]
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [free[2]]}))
    with torch.inference_mode():
        outputs, steps = _hf_generate(load_hf(model_dir, "float32"), [request])
    assert outputs == [free] and len(free) == 12 and steps == 12
