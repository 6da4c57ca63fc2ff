"""How loom's CPU kernels are built and loaded (the wrappers that call them: loom/kernels/cpu.py).

The C files are compiled together on first use with the machine's C compiler (`$CC`, else `cc`) and
`-march=native`, into ~/.cache/loom/kernels/ keyed by the sources, the flags, the compiler and the CPU's
flags; processes racing to build it each build a temporary file and rename it into place. Where no
compiler is found, the build fails or the CPU lacks AVX2 and FMA, `available()` is False and the layers
take torch's ops (logged once). LOOM_CPU_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from loom.paths import cache_dir

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / "gemv.c", HERE / "attention.c", HERE / "elementwise.c", HERE / "decoder.c"]
HEADERS = [HERE / "common.h"]
# -ffp-contract=off: scalar code rounds each product as the torch twins do (no silent FMA contraction).
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def kernel_dir() -> Path:
    return cache_dir("kernels")


def build(compiler: str) -> Path:
    """Compile the kernels (once per source, flags, compiler and CPU); return the shared library's path."""
    parts = [f.read_bytes() for f in SOURCES + HEADERS]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join([*parts, " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode()])
    )
    target = kernel_dir() / f"loom-cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, *map(str, SOURCES), "-lm", "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(
                f"{compiler} failed to build loom's CPU kernels: {proc.stderr.strip()[-2000:]}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@cache
def library() -> ctypes.CDLL | None:
    if os.environ.get("LOOM_CPU_KERNELS", "1") == "0":
        return None
    cc = compiler()
    if cc is None:
        logger.warning("no C compiler found: loom's CPU kernels are off, torch's ops run instead")
        return None
    try:
        lib = ctypes.CDLL(str(build(cc)))
    except (OSError, RuntimeError) as e:
        logger.warning("loom's CPU kernels are off, torch's ops run instead: %s", e)
        return None
    if not lib.loom_native():
        logger.info("this CPU lacks AVX2 and FMA: loom's CPU kernels are off")
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("loom_gemv_bf16", "loom_gemv_int8"):
        # x, x_kind, w (panels), scale, bias, y, y_kind, M, N, K, nthreads -> 0 or -1 (out of memory)
        getattr(lib, name).argtypes = [p, i32, p, p, p, p, i32, i64, i64, i64, i32]
        getattr(lib, name).restype = i32
    # x, x_kind, w, scale, zero, group_size, bias, y, y_kind, M, N, K, nthreads -> 0 or -1
    lib.loom_gemv_int4.argtypes = [p, i32, p, p, p, i64, p, p, i32, i64, i64, i64, i32]
    lib.loom_gemv_int4.restype = i32
    f32 = ctypes.c_float
    # q, k_cache, v_cache, block_table, seq_lens, out, kind, S, H, KvH, D, num_blocks, block_size,
    # max_blocks, scale, nthreads -> 0 or -1
    lib.loom_attention_decode.argtypes = [p, p, p, p, p, p, i32, i64, i64, i64, i64, i64, i64, i64, f32, i32]
    lib.loom_attention_decode.restype = i32
    # x, residual, w, y, sum_out, kind, M, K, eps, nthreads
    lib.loom_rms_norm.argtypes = [p, p, p, p, p, i32, i64, i64, f32, i32]
    lib.loom_rms_norm.restype = None
    # x, y, kind, M, I, nthreads
    lib.loom_silu_and_mul.argtypes = [p, p, i32, i64, i64, i32]
    lib.loom_silu_and_mul.restype = None
    # x, x_stride, y, cos, sin, kind, T, heads, head_dim, rotary_dim, interleaved, nthreads
    lib.loom_rotary.argtypes = [p, i64, p, p, p, i32, i64, i64, i64, i64, i32, i32]
    lib.loom_rotary.restype = None
    # stack, x, out, T, cos, sin, slots, block_table, max_blocks, seq_lens, nthreads -> 0, -1 or -2
    lib.loom_decode_stack.argtypes = [p, p, p, i64, p, p, p, p, i64, p, i32]
    lib.loom_decode_stack.restype = i32
    return lib


def available() -> bool:
    """Whether the kernels run here (built, loaded, and the CPU has AVX2 and FMA)."""
    return library() is not None
