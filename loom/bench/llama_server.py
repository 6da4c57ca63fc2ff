"""llama.cpp's `llama-server` and `llama-quantize`, built from llama-cpp-python's source distribution (the
only llama.cpp source a package registry serves), and the command lines `loom bench llama-server` runs.

    loom bench llama-server build                 # pip download the sdist, cmake, ~15 min on 2 cores, once
    loom bench llama-server gguf --types f32,bf16,q8_0,q4_0
    loom bench llama-server compare --dtype bfloat16 --concurrency 16

The build lives in ~/.cache/loom/llama.cpp/<version>/: the sdist, its extracted source (whose
convert_hf_to_gguf.py `gguf` uses), the cmake build tree, bin/llama-server, bin/llama-quantize and
build.json (the cmake flags and what ggml chose for this CPU). CPU only, no CURL/OpenSSL, no web UI
(the UI would be downloaded at build time), ggml's native ISA (-march=native: AVX2/FMA/F16C here, AVX-512
where the CPU has it), static libraries so the binaries run from the cache alone.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from loom import paths
from loom.bench import gguf
from loom.bench.peers import Peer

logger = logging.getLogger(__name__)

# The version the README's llama.cpp figures were measured with; an installed llama-cpp-python wins.
DEFAULT_VERSION = "0.3.36"
TARGETS = ("llama-server", "llama-quantize")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # the binaries need nothing but themselves
    "-DGGML_NATIVE=ON",  # -march=native: the ISA of this CPU (ggml's default unless cross-compiling)
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",  # no HTTPS model downloads (llama.cpp dropped its CURL option for httplib)
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else the build downloads the web UI from a model hub
)
# GGUF types `llama-quantize` makes from the f32 GGUF (its names, lower-cased); the rest come from the
# converter (gguf.OUTTYPES values).
QUANT_TYPES = ("q8_0", "q4_0", "q4_k_m", "q4_k_s", "q5_k_m", "q6_k")
CONVERT_TYPES = tuple(gguf.OUTTYPES.values())
# Each GGUF type's KV cache type in llama-server, matching the activations loom runs with that weight
# format: fp32 with f32 weights, else bf16 (loom's int8/int4 keep bf16 activations and KV).
KV_TYPES = {"f32": "f32", "f16": "f16"}


class LlamaServerError(RuntimeError):
    """llama.cpp could not be built, found or run (the message says which and how to fix it)."""


@dataclass
class Build:
    """A finished build in the cache."""

    version: str
    dir: Path
    server: Path
    quantize: Path
    source: Path
    """The extracted sdist (its vendor/llama.cpp holds the converter)."""

    @property
    def info(self) -> dict:
        path = self.dir / "build.json"
        return json.loads(path.read_text()) if path.exists() else {}


def installed_version() -> str | None:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def default_version() -> str:
    """The installed llama-cpp-python's version (so server and offline baseline are the same llama.cpp),
    else DEFAULT_VERSION."""
    return installed_version() or DEFAULT_VERSION


def source_version(src: Path) -> str:
    """The llama-cpp-python version of an sdist (from its file name) or a source directory (its
    llama_cpp/__init__.py)."""
    src = Path(src)
    if src.is_file():
        m = re.match(r"llama_cpp_python-(.+?)\.(tar\.gz|tgz)$", src.name)
        if not m:
            raise LlamaServerError(f"{src} is not a llama-cpp-python sdist (llama_cpp_python-VERSION.tar.gz)")
        return m.group(1)
    init = src / "llama_cpp" / "__init__.py"
    m = re.search(r'__version__\s*=\s*"([^"]+)"', init.read_text()) if init.is_file() else None
    if not m:
        raise LlamaServerError(f"{src} is not llama-cpp-python's source: no version in {init}")
    return m.group(1)


def cache_dir(version: str) -> Path:
    """Where llama.cpp `version` is built (under loom's cache root, read at each call)."""
    return paths.cache_dir("llama.cpp", version)


def find_build(version: str | None = None) -> Build | None:
    """The cached build of `version` (default: default_version()), or None if it was never built."""
    version = version or default_version()
    d = cache_dir(version)
    b = Build(version, d, d / "bin" / TARGETS[0], d / "bin" / TARGETS[1], d / "src")
    return b if b.server.is_file() and b.quantize.is_file() else None


def require_build(version: str | None = None) -> Build:
    build = find_build(version)
    if build is None:
        v = version or default_version()
        raise LlamaServerError(
            f"llama.cpp {v} is not built: run `loom bench llama-server build` (about 15 minutes on 2 cores) "
            f"or pass --llama-server PATH"
        )
    return build


def download_command(version: str, dest: Path) -> list[str]:
    """pip download of the sdist only: no wheel (it holds no server), no dependencies."""
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"llama-cpp-python=={version}", "-d", str(dest),
    ]  # fmt: skip


def configure_command(source: Path, build_dir: Path) -> list[str]:
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    return [
        "cmake",
        "-S",
        str(source / "vendor" / "llama.cpp"),
        "-B",
        str(build_dir),
        *generator,
        *CMAKE_FLAGS,
    ]


def build_command(build_dir: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build_dir), "--target", *TARGETS, "-j", str(jobs)]


@contextmanager
def _build_lock(d: Path) -> Iterator[None]:
    """One build of a version at a time, across processes (a second caller fails at once)."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise LlamaServerError(
                f"another build of llama.cpp is running in {d} ({f.read().strip() or 'pid unknown'})"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_logged(cmd: list[str], log_path: Path, nice: int) -> None:
    """Run `cmd` at niceness `nice`, its output appended to log_path; raise with the log's tail on failure."""
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(
            ["nice", "-n", str(nice), *cmd], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise LlamaServerError(
            f"`{' '.join(cmd[:3])} ...` failed (exit {proc.returncode}); {log_path}:\n{tail}"
        )


def _fetch_source(version: str, d: Path, src: Path | None, log_path: Path) -> Path:
    """The extracted source in d/src, from `src` (sdist or directory) or pip download."""
    source = d / "src"
    if (source / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return source
    if src is not None and Path(src).is_dir():
        shutil.copytree(src, source, symlinks=True)
        return source
    tarball = Path(src) if src is not None else d / f"llama_cpp_python-{version}.tar.gz"
    if not tarball.is_file():
        logger.info("downloading llama-cpp-python %s's source distribution from PyPI", version)
        _run_logged(download_command(version, d), log_path, nice=0)
        found = sorted(d.glob("llama_cpp_python-*.tar.gz"))
        if not found:
            raise LlamaServerError(f"pip download left no llama_cpp_python-*.tar.gz in {d}")
        tarball = found[0]
    staging = d / "src.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(staging, filter="data")
    (top,) = list(staging.iterdir())  # an sdist has one top directory
    top.rename(source)
    staging.rmdir()
    return source


def _isa_summary(build_dir: Path) -> str:
    """What ggml compiled its CPU backend for: the -march/-m flags in the cmake cache."""
    flags = []
    cache = build_dir / "CMakeCache.txt"
    text = cache.read_text(errors="replace") if cache.exists() else ""
    for name in ("GGML_NATIVE", "GGML_AVX", "GGML_AVX2", "GGML_AVX512", "GGML_FMA", "GGML_F16C"):
        if m := re.search(rf"^{name}:BOOL=(\w+)$", text, re.M):
            flags.append(f"{name}={m.group(1)}")
    return " ".join(flags)


def build(version: str | None = None, src: Path | None = None, jobs: int = 2, nice: int = 10) -> Build:
    """Build llama-server and llama-quantize once per version (a cached build returns at once).

    `src` is llama-cpp-python's sdist or source directory; without it the sdist of `version` comes from
    PyPI through pip. The compilers run at niceness `nice` with `jobs` parallel jobs."""
    if src is not None:
        src_version = source_version(Path(src))
        if version is not None and version != src_version:
            raise LlamaServerError(f"--src is llama-cpp-python {src_version}, not the {version} asked for")
        version = src_version
    version = version or default_version()
    if (found := find_build(version)) is not None:
        return found
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise LlamaServerError(f"building llama.cpp needs {tool} (Debian: apt-get install cmake g++)")
    d = cache_dir(version)
    with _build_lock(d):
        if (found := find_build(version)) is not None:  # built by whoever held the lock before us
            return found
        log_path = d / "build.log"
        start = time.monotonic()
        source = _fetch_source(version, d, src, log_path)
        build_dir = d / "build"
        configure = configure_command(source, build_dir)
        compile_ = build_command(build_dir, jobs)
        logger.info("building llama.cpp %s in %s (log: %s)", version, build_dir, log_path)
        _run_logged(configure, log_path, nice)
        _run_logged(compile_, log_path, nice)
        (d / "bin").mkdir(exist_ok=True)
        for target in TARGETS:
            shutil.copy2(build_dir / "bin" / target, d / "bin" / target)
        info = {
            "version": version,
            "configure": configure,
            "build": compile_,
            "isa": _isa_summary(build_dir),
            "seconds": round(time.monotonic() - start, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        (d / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    built = find_build(version)
    assert built is not None
    return built


# ---- GGUF files ---------------------------------------------------------------------------------------


def gguf_types(spec: str) -> list[str]:
    """Validate a comma-separated list of GGUF types (f32,bf16,q8_0,...)."""
    types = [t.strip().lower() for t in spec.split(",") if t.strip()]
    if not types:
        raise LlamaServerError("no GGUF type given")
    bad = [t for t in types if t not in CONVERT_TYPES + QUANT_TYPES]
    if bad:
        raise LlamaServerError(f"unknown GGUF types {bad}; choose from {list(CONVERT_TYPES + QUANT_TYPES)}")
    return types


def quantize_command(quantize: Path, source: Path, out: Path, gguf_type: str, threads: int) -> list[str]:
    """llama-quantize SOURCE OUT TYPE THREADS (its type names are upper case: Q8_0, Q4_K_M)."""
    return [str(quantize), str(source), str(out), gguf_type.upper(), str(threads)]


def gguf_path(model_dir: Path, gguf_type: str) -> Path:
    """Where the GGUF of `model_dir` in `gguf_type` is cached (the naming gguf.convert uses)."""
    model_dir = Path(model_dir).resolve()
    return gguf.cache() / f"{model_dir.name}-{gguf.fingerprint(model_dir)}-{gguf_type}.gguf"


def make_gguf(model_dir: Path, gguf_type: str, build: Build, threads: int = 2) -> Path:
    """The GGUF of `model_dir` in `gguf_type`, cached: f32/bf16/f16 from the converter in the build's
    source, quantized types by llama-quantize from the f32 GGUF (the most precise source)."""
    (gguf_type,) = gguf_types(gguf_type)
    by_outtype = {v: k for k, v in gguf.OUTTYPES.items()}
    if gguf_type in by_outtype:
        return gguf.convert(
            model_dir, by_outtype[gguf_type], build.source, out=gguf_path(model_dir, gguf_type)
        )
    out = gguf_path(model_dir, gguf_type)
    if out.exists():
        return out
    base = make_gguf(model_dir, "f32", build, threads)
    tmp = out.with_suffix(".partial")
    proc = subprocess.run(
        quantize_command(build.quantize, base, tmp, gguf_type, threads), capture_output=True, text=True
    )
    if proc.returncode != 0 or not tmp.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise LlamaServerError(f"llama-quantize to {gguf_type} failed (exit {proc.returncode}):\n{tail}")
    tmp.rename(out)
    return out


# ---- the server ---------------------------------------------------------------------------------------


@dataclass
class ServerOptions:
    """How `loom bench llama-server compare` runs llama-server."""

    threads: int
    """--threads and --threads-batch: the same count as loom's --num-threads."""
    parallel: int
    """--parallel: slots, one per concurrent request."""
    ctx_per_slot: int
    """Context each slot needs (longest prompt + output); --ctx-size is this times `parallel`."""
    kv_type: str = "f16"
    """--cache-type-k/-v: the KV cache's type (f32 with f32 weights, as loom's fp32 KV)."""
    alias: str = "model"
    """--alias: the model name /v1/models reports and requests send."""
    extra: tuple[str, ...] = ()
    """More llama-server flags, appended last (they override these)."""

    @property
    def ctx_size(self) -> int:
        # Round up to 256 tokens a slot, so the KV cache splits evenly among slots.
        per_slot = -(-self.ctx_per_slot // 256) * 256
        return per_slot * self.parallel


def kv_type_for(gguf_type: str) -> str:
    """llama-server's KV cache type for a weight type: f32 for f32 (else fp32 greedy outputs part from HF's
    after about half the tokens), bf16 for the rest (loom's bf16 and int8/int4 runs keep bf16 KV)."""
    return KV_TYPES.get(gguf_type, "bf16")


def server_command(server: Path, model: Path, host: str, port: int, opts: ServerOptions) -> list[str]:
    """The llama-server command line: continuous batching over `parallel` slots, no prompt cache (a
    request never reuses another's KV, across rounds or within one), no web UI, loopback only."""
    return [
        str(server), "--model", str(model), "--alias", opts.alias,
        "--host", host, "--port", str(port),
        "--threads", str(opts.threads), "--threads-batch", str(opts.threads),
        "--parallel", str(opts.parallel), "--ctx-size", str(opts.ctx_size), "--cont-batching",
        "--cache-type-k", opts.kv_type, "--cache-type-v", opts.kv_type,
        "--no-cache-prompt", "--cache-ram", "0", "--no-webui",
        *opts.extra,
    ]  # fmt: skip


def build_summary(build: Build) -> dict:
    """What the report says about the llama.cpp build."""
    return {"version": build.version, "server": str(build.server), **build.info}


def llama_peer(
    name: str, server: Path, model: Path, port: int, opts: ServerOptions, log: Path | None = None
) -> Peer:
    """llama-server as a `compare` peer; its timed requests send cache_prompt false as well."""
    argv = server_command(server, model, "127.0.0.1", port, opts)
    return Peer(name, "llama.cpp", argv, port, opts.alias, extra_body={"cache_prompt": False}, log=log)


def system_info(log: Path | None) -> str:
    """The ISA line llama.cpp logs at start ("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | ..."), or ""."""
    if log is None or not log.exists():
        return ""
    for line in log.read_text(errors="replace").splitlines():
        if "system_info:" in line:
            return line.split("system_info:", 1)[1].strip()
    return ""
