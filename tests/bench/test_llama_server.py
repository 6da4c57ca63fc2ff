"""`loom bench llama-server`: flag validation, the llama.cpp build/GGUF/server command lines, and the
alternating comparison run end to end against two real `loom serve` processes standing in for both peers
(compiling llama.cpp takes ~15 minutes, so the build itself is documented in benchmarks/README.md and not
run here)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import httpx
import psutil
import pytest

from loom.bench import compare, gguf, llama_server, peers
from loom.bench.compare_report import COMPARE_SCHEMA, ROUND_SCHEMA, format_compare
from loom.bench.serve import BenchError
from loom.entrypoints.cli import build_parser
from loom.errors import InvalidRequest
from loom.models.config import ModelConfig
from loom.tokenizer import Tokenizer

from loom.bench.cli import compare_plan, loom_name  # isort: skip


def parse(*flags: str):
    return build_parser().parse_args(["bench", "llama-server", "compare", *flags])


# ---- command-line validation -----------------------------------------------------------------------------


def test_compare_flags_default_to_the_matching_gguf_and_pass_extra_flags_through(tmp_path):
    settings, gguf_type, loom_args, llama_args = compare_plan(parse())
    assert gguf_type == "bf16"  # --dtype bfloat16 by default
    assert (settings.num_requests, settings.rounds, settings.concurrency, settings.warmup_requests) == (
        48,
        3,
        16,
        16,
    )
    assert (loom_args, llama_args) == ([], [])

    args = parse(
        "--dtype", "float32", "--concurrency", "1", "--loom-args", "--quantization int8 --max-num-seqs 4",
        "--llama-server-args", "--flash-attn off", "--gguf-type", "Q8_0", "--warmup", "0",
    )  # fmt: skip
    settings, gguf_type, loom_args, llama_args = compare_plan(args)
    assert gguf_type == "q8_0" and settings.warmup_requests == 0
    assert loom_args == ["--quantization", "int8", "--max-num-seqs", "4"]
    assert llama_args == ["--flash-attn", "off"]
    assert compare_plan(parse("--dtype", "float32"))[1] == "f32"
    assert loom_name("bfloat16", loom_args) == "loom (bfloat16, int8)"
    assert loom_name("float32", []) == "loom (float32)"
    assert (
        loom_name("bfloat16", ["--quantization=int4", "--quantization-group-size", "32"])
        == "loom (bfloat16, int4)"
    )


@pytest.mark.parametrize(
    ("flags", "param"),
    [
        (("--concurrency", "0"), "concurrency"),
        (("--rounds", "0"), "rounds"),
        (("--num-requests", "0"), "num_requests"),
        (("--threads", "0"), "threads"),
        (("--workload", "agent"), "workload"),
        (("--gguf-type", "q3_xx"), "gguf_type"),
        (("--gguf", "/nonexistent/model.gguf"), "gguf"),
        (("--loom-args", "--quantization 'int8"), None),
        (("--agreement-tokens", "0"), "agreement_prompts"),
    ],
)
def test_compare_refuses_bad_flags_before_starting_anything(flags, param):
    with pytest.raises(InvalidRequest) as e:
        compare_plan(parse(*flags))
    assert e.value.param == param


def test_bad_flags_exit_with_a_message_through_the_loom_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "loom.entrypoints.cli", "bench", "llama-server", "compare", "--rounds", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "loom bench llama-server compare: rounds must be >= 1, got 0" in proc.stderr
    with pytest.raises(SystemExit):  # argparse: --dtype takes only loom's CPU dtypes here
        parse("--dtype", "float16")


# ---- build, GGUF and server command lines ----------------------------------------------------------------


def test_build_downloads_only_the_sdist_from_pypi_and_configures_a_cpu_server_build(tmp_path):
    cmd = llama_server.download_command("0.3.36", tmp_path)
    assert cmd[:3] == [sys.executable, "-m", "pip"] and cmd[3] == "download"
    assert {"--no-deps", "llama-cpp-python==0.3.36"} <= set(cmd)
    assert cmd[cmd.index("--no-binary") + 1] == ":all:"

    configure = llama_server.configure_command(tmp_path / "src", tmp_path / "build")
    assert configure[:3] == ["cmake", "-S", str(tmp_path / "src" / "vendor" / "llama.cpp")]
    for flag in (
        "-DLLAMA_BUILD_SERVER=ON",
        "-DGGML_NATIVE=ON",
        "-DGGML_CUDA=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
    ):
        assert flag in configure
    assert "-DLLAMA_OPENSSL=OFF" in configure and "-DBUILD_SHARED_LIBS=OFF" in configure
    assert llama_server.build_command(tmp_path / "build", 3) == [
        "cmake", "--build", str(tmp_path / "build"), "--target", "llama-server", "llama-quantize", "-j", "3",
    ]  # fmt: skip


def test_source_version_from_an_sdist_name_or_a_source_directory(tmp_path):
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    sdist.write_bytes(b"")
    assert llama_server.source_version(sdist) == "0.3.36"
    (tmp_path / "src" / "llama_cpp").mkdir(parents=True)
    (tmp_path / "src" / "llama_cpp" / "__init__.py").write_text(
        'from .llama_cpp import *\n__version__ = "0.3.20"\n'
    )
    assert llama_server.source_version(tmp_path / "src") == "0.3.20"
    other = tmp_path / "other.tar.gz"
    other.write_bytes(b"")
    with pytest.raises(llama_server.LlamaServerError, match="not a llama-cpp-python sdist"):
        llama_server.source_version(other)
    with pytest.raises(llama_server.LlamaServerError, match="--src is llama-cpp-python 0.3.36"):
        llama_server.build("0.3.1", src=sdist)


def test_a_missing_build_says_how_to_make_one_and_a_cached_one_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tmp_path = tmp_path / "loom" / "llama.cpp"
    assert llama_server.find_build("9.9.9") is None
    with pytest.raises(llama_server.LlamaServerError, match="loom bench llama-server build"):
        llama_server.require_build("9.9.9")
    (tmp_path / "9.9.9" / "bin").mkdir(parents=True)
    for target in llama_server.TARGETS:
        (tmp_path / "9.9.9" / "bin" / target).write_text("")
    b = llama_server.build("9.9.9")  # cached: returns without downloading or compiling
    assert b.server == tmp_path / "9.9.9" / "bin" / "llama-server" and b.source == tmp_path / "9.9.9" / "src"


def test_only_one_build_of_a_version_runs_at_a_time(tmp_path):
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with llama_server._build_lock(tmp_path):
            inside.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert inside.wait(30)
        # flock locks per open file description, so a second open in this process conflicts too.
        with pytest.raises(llama_server.LlamaServerError, match=r"another build .* \(pid \d+\)"):
            with llama_server._build_lock(tmp_path):
                pass
    finally:
        release.set()
        t.join()
    with llama_server._build_lock(tmp_path):  # free again
        pass


def test_gguf_types_and_quantize_command(tmp_path, tiny_llama_dir):
    assert llama_server.gguf_types("f32, BF16,q8_0,q4_0,q4_k_m") == ["f32", "bf16", "q8_0", "q4_0", "q4_k_m"]
    with pytest.raises(llama_server.LlamaServerError, match="unknown GGUF types"):
        llama_server.gguf_types("f32,int4")
    with pytest.raises(llama_server.LlamaServerError, match="no GGUF type"):
        llama_server.gguf_types(" , ")
    q = llama_server.quantize_command(
        tmp_path / "llama-quantize", tmp_path / "a.gguf", tmp_path / "b.gguf", "q4_k_m", 2
    )
    assert q == [
        str(tmp_path / "llama-quantize"),
        str(tmp_path / "a.gguf"),
        str(tmp_path / "b.gguf"),
        "Q4_K_M",
        "2",
    ]
    # One cache naming for converted and quantized files, keyed by the checkpoint's fingerprint.
    path = llama_server.gguf_path(tiny_llama_dir, "q8_0")
    assert path.parent == gguf.cache()
    assert path.name == f"{tiny_llama_dir.name}-{gguf.fingerprint(tiny_llama_dir)}-q8_0.gguf"


def test_server_command_runs_parallel_slots_without_prompt_reuse(tmp_path):
    opts = llama_server.ServerOptions(
        threads=2,
        parallel=16,
        ctx_per_slot=400,
        kv_type=llama_server.kv_type_for("f32"),
        extra=("--threads", "1"),
    )
    cmd = llama_server.server_command(tmp_path / "llama-server", tmp_path / "m.gguf", "127.0.0.1", 8123, opts)

    def value(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert (value("--threads"), value("--threads-batch"), value("--parallel")) == ("2", "2", "16")
    assert value("--ctx-size") == str(16 * 512)  # 400 tokens a slot, rounded up to 256s
    assert (value("--cache-type-k"), value("--cache-type-v")) == ("f32", "f32")
    assert (value("--host"), value("--port"), value("--cache-ram")) == ("127.0.0.1", "8123", "0")
    assert "--cont-batching" in cmd and "--no-cache-prompt" in cmd
    assert cmd[-2:] == ["--threads", "1"]  # extra flags last, so they win
    assert [llama_server.kv_type_for(t) for t in ("f32", "bf16", "q8_0", "q4_0")] == [
        "f32",
        "bf16",
        "bf16",
        "bf16",
    ]
    peer = llama_server.llama_peer("llama.cpp", tmp_path / "llama-server", tmp_path / "m.gguf", 8123, opts)
    assert peer.ready_path == "/health" and peer.extra_body == {"cache_prompt": False} and peer.argv == cmd


def test_system_info_is_read_from_the_llama_server_log(tmp_path):
    log = tmp_path / "llama.log"
    log.write_text("main: loading\nsystem_info: n_threads = 1 / 2 | CPU : AVX2 = 1 | FMA = 1 |\nready\n")
    assert llama_server.system_info(log) == "n_threads = 1 / 2 | CPU : AVX2 = 1 | FMA = 1 |"
    assert llama_server.system_info(tmp_path / "none.log") == ""


# ---- the comparison, against two real servers --------------------------------------------------------------


def test_round_order_alternates_which_server_goes_first():
    assert compare.round_order(["a", "b"], 3) == [(0, 0), (0, 1), (1, 1), (1, 0), (2, 0), (2, 1)]


def _generated(peer: peers.Peer) -> float:
    text = httpx.get(peer.url + "/metrics", timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith("loom_generation_tokens_total "))
    return float(line.split()[1])


def _is_closed(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    except httpx.TransportError:
        return True
    return False


def test_two_servers_get_the_same_requests_in_alternating_rounds(tiny_llama_dir, tmp_path):
    cfg = ModelConfig.from_dir(tiny_llama_dir)
    tokenizer = Tokenizer(tiny_llama_dir)
    servers = [
        peers.loom_peer(name, tiny_llama_dir, "float32", 1, peers.free_port(), "m", ["--num-blocks", "512"], tmp_path / f"{name}.log")
        for name in ("a", "b")
    ]  # fmt: skip
    settings = compare.CompareSettings(
        num_requests=4, rounds=2, concurrency=2, seed=5, agreement_prompts=2, agreement_tokens=8
    )
    seen: dict[str, float] = {}

    def info(peer: peers.Peer) -> dict:  # called while both servers still run
        seen[peer.name] = _generated(peer)
        return {"generated": seen[peer.name]}

    def decode(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    result = compare.run_compare(
        servers, settings, cfg.vocab_size, cfg.max_position_embeddings, decode, "loom bench ...", info
    )

    assert set(result) == set(COMPARE_SCHEMA)
    assert all(set(r) == set(ROUND_SCHEMA) for r in result["rounds"])
    assert [(r["round"], r["peer"]) for r in result["rounds"]] == [(0, "a"), (0, "b"), (1, "b"), (1, "a")]
    plan = compare.plan_workloads(settings, cfg.vocab_size, cfg.max_position_embeddings)
    for r in result["rounds"]:
        assert r["seed"] == 5 + r["round"]
        assert (r["completed"], r["failed"]) == (4, 0)
        assert r["output_tokens"] == sum(it.max_tokens for it in plan.rounds[r["round"]].items)
        assert r["output_tok_s"] > 0 and r["ttft_p50_ms"] > 0 and r["other_load_cores"] >= 0
    # Each server generated exactly: the agreement prompts (greedy, may stop at EOS), its warm-up
    # and its two rounds; the same on both, as both are the same model.
    timed = sum(it.max_tokens for w in plan.rounds + [plan.warmup] for it in w.items)
    assert seen["a"] == seen["b"] and timed < seen["a"] <= timed + 2 * 8
    # The same fp32 weights greedy on both: identical tokens.
    assert result["agreement"]["token_agreement"] == 1.0 and result["agreement"]["identical"] == 2
    summary = result["summary"]
    assert summary["ratio"]["output_tok_s"] == pytest.approx(
        summary["a"]["output_tok_s"] / summary["b"]["output_tok_s"]
    )
    assert result["settings"]["output_tokens"] == sum(it.max_tokens for it in plan.rounds[0].items)
    assert all(_is_closed(p.port) for p in servers)  # both stopped

    json.loads(json.dumps(result))
    table = format_compare(result)
    assert "| metric (median of rounds) | a | b | a / b |" in table
    assert table.count("\n| 1 | ") == 2 and "reproduce: loom bench ..." in table
    assert "greedy agreement a vs b: 100% of tokens, 2/2 outputs identical" in table


def test_a_server_that_fails_to_start_stops_the_other(tiny_llama_dir, tmp_path):
    good = peers.loom_peer(
        "good", tiny_llama_dir, "float32", 1, peers.free_port(), "m", log=tmp_path / "good.log"
    )
    bad = peers.loom_peer(
        "bad", tmp_path / "no-model", "float32", 1, peers.free_port(), "m", log=tmp_path / "bad.log"
    )
    settings = compare.CompareSettings(num_requests=1, rounds=1, concurrency=1, timeout=120)
    with pytest.raises(BenchError, match=r"bad exited with 2 while starting(.|\n)*does not exist"):
        compare.run_compare([good, bad], settings, 100, 512, str)
    # good was started and ready first (peers start in order); nothing of it is left running.
    assert _is_closed(good.port)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(good.port) in (p.info["cmdline"] or [])]
