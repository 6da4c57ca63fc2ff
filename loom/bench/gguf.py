"""GGUF files for the llama.cpp baseline, made with the converter that ships inside llama-cpp-python's
source (vendor/llama.cpp/convert_hf_to_gguf.py), on the very checkpoint loom and HF load.

The steps (also what `loom bench throughput --llama-cpp-src SDIST` does for you):

    pip install 'loom[llama-cpp]'                 # llama-cpp-python (builds llama.cpp), sentencepiece
    pip download --no-deps --no-binary :all: llama-cpp-python==$(pip show llama-cpp-python | sed -n 's/^Version: //p') -d /tmp/lcp
    loom bench throughput --llama-cpp-src /tmp/lcp/llama_cpp_python-*.tar.gz      # converts, caches, runs

or by hand, from the extracted source:

    python vendor/llama.cpp/convert_hf_to_gguf.py MODEL_DIR --outtype f32 --outfile model-f32.gguf
    loom bench throughput --model MODEL_DIR --gguf float32=model-f32.gguf

The converter recognizes a BPE tokenizer by hashing how it splits a test text; the tiny models' tokenizers
are trained locally, so no hash matches and it refuses them. The benchmark feeds token ids and never
tokenizes through llama.cpp, so `convert` falls back to llama.cpp's "default" pre-tokenizer for an
unrecognized tokenizer (real checkpoints are recognized and converted unchanged).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from loom.paths import cache_dir

OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
CONVERTER = "convert_hf_to_gguf.py"


def cache() -> Path:
    """Where GGUFs and unpacked sdists are kept (under loom's cache root, read at each call)."""
    return cache_dir("gguf")


# Runs the converter with one change: an unrecognized BPE pre-tokenizer becomes "default" (see above).
_BOOTSTRAP = """
import runpy, sys
src = sys.argv[1]
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[2:]]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base
recognized = base.TextModel.get_vocab_base_pre
def pre_tokenizer(self, tokenizer):
    try:
        return recognized(self, tokenizer)
    except NotImplementedError:
        return "default"
base.TextModel.get_vocab_base_pre = pre_tokenizer
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class GGUFError(RuntimeError):
    pass


def find_converter(src: Path) -> Path:
    """The directory holding convert_hf_to_gguf.py: `src` itself, its vendor/llama.cpp, or, for an sdist
    tarball, that directory extracted next to the cache."""
    src = Path(src)
    if src.is_file() and src.name.endswith((".tar.gz", ".tgz")):
        src = _extract(src)
    for d in (src, src / "vendor" / "llama.cpp"):
        if (d / CONVERTER).is_file():
            return d
    raise GGUFError(f"no {CONVERTER} in {src} or {src / 'vendor' / 'llama.cpp'}")


def _extract(tarball: Path) -> Path:
    """Extract the converter, its `conversion` package and gguf-py from an sdist (once)."""
    out = cache() / "src" / tarball.name.removesuffix(".tar.gz").removesuffix(".tgz")
    if (out / "vendor" / "llama.cpp" / CONVERTER).is_file():
        return out
    wanted = (f"/vendor/llama.cpp/{CONVERTER}", "/vendor/llama.cpp/conversion/", "/vendor/llama.cpp/gguf-py/")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if any(w in m.name for w in wanted)]
        if not members:
            raise GGUFError(f"{tarball} holds no vendor/llama.cpp/{CONVERTER}")
        tar.extractall(staging, members=members, filter="data")
    shutil.rmtree(out, ignore_errors=True)
    (staging / members[0].name.split("/")[0]).rename(out)  # the sdist's top directory
    shutil.rmtree(staging)
    return out


def fingerprint(model_dir: Path) -> str:
    """Changes when the checkpoint does: names, sizes and mtimes of its files."""
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def convert(model_dir: Path, dtype: str, src: Path, out: Path | None = None) -> Path:
    """The GGUF of `model_dir` in `dtype`, converted with the llama.cpp source at `src` (see
    find_converter); cached under ~/.cache/loom/gguf by checkpoint fingerprint unless `out` is given."""
    if dtype not in OUTTYPES:
        raise GGUFError(f"llama.cpp has no {dtype} GGUF here; choose from {sorted(OUTTYPES)}")
    model_dir = Path(model_dir).resolve()
    if out is None:
        out = cache() / f"{model_dir.name}-{fingerprint(model_dir)}-{OUTTYPES[dtype]}.gguf"
    if out.exists():
        return out
    converter = find_converter(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    cmd = [sys.executable, "-c", _BOOTSTRAP, str(converter), str(model_dir)]
    cmd += ["--outtype", OUTTYPES[dtype], "--outfile", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise GGUFError(f"GGUF conversion of {model_dir} failed (exit {proc.returncode}):\n{tail}")
    tmp.rename(out)
    return out
