"""loom's own CPU kernels for bf16 and int8 weights times up to `MAX_ROWS` float32 rows (gemv.c).

Why: a decode step with a few sequences streams every weight from memory once, so its speed is the
weights' bytes over the memory bandwidth, if the kernel reads them as stored. On a CPU without native
bf16 (AVX2) torch has no such kernel: a bf16 weight runs fastest as a float32 copy (twice the bytes),
and `_weight_int8pack_mm` is compute-bound. gemv.c widens the stored weights in registers and
prefetches the next block of output channels. Measured on the 2-vCPU AVX2 VM, the 12 layers of the 89M
Llama (weights cold in memory, as in a real step), one thread, ms per pass over all linears:

| rows | float32 copy, F.linear | gemv bf16 | torch int8 | gemv int8 |
|---:|---:|---:|---:|---:|
| 1 | 36-41 | 17-22 | 25-30 | 10-11 |
| 16 | 136-154 | 78-83 | 116-119 | 68-79 |
| 64 | 256 | 236 | 312 | 207 |
| 128 | 333 | 413 | 540 | 401 |

Past `MAX_ROWS` rows the weights are reused enough that a float32 GEMM (the weight widened per call,
5-10% dearer than a kept float32 copy) wins; the methods switch there.

The C file is compiled on first use with the machine's C compiler (`$CC`, else `cc`) and `-march=native`,
into ~/.cache/loom/kernels/ keyed by the source, the flags, the compiler and the CPU's flags; processes
racing to build it each build a temporary file and rename it into place. Where no compiler is found, the
build fails or the CPU lacks AVX2 and FMA, `available()` is False and the methods take torch's kernels
(logged once). LOOM_CPU_KERNELS=0 turns the kernels off.
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

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
# The kernels read 8 input channels at a time.
K_MULTIPLE = 8
# The most rows the methods send to these kernels (the table above).
MAX_ROWS = 64


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def kernel_dir() -> Path:
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_root / "loom" / "kernels"


def build(compiler: str) -> Path:
    """Compile gemv.c (once per source, compiler and CPU) and return the shared library's path."""
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode()])
    )
    target = kernel_dir() / f"gemv-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{compiler} failed to build {SOURCE.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LOOM_CPU_KERNELS", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found: loom's CPU GEMV kernels are off, torch's kernels run instead")
        return None
    try:
        lib = ctypes.CDLL(str(build(compiler)))
    except (OSError, RuntimeError) as e:
        logger.warning("loom's CPU GEMV kernels are off, torch's kernels run instead: %s", e)
        return None
    if not lib.loom_gemv_native():
        logger.info("this CPU lacks AVX2 and FMA: loom's CPU GEMV kernels are off")
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("loom_gemv_bf16", "loom_gemv_int8"):
        getattr(lib, name).argtypes = [p, p, p, p, i64, i64, i64, i32]
        getattr(lib, name).restype = None
    return lib


def available() -> bool:
    """Whether the kernels run here (built, loaded, and the CPU has AVX2 and FMA)."""
    return _library() is not None


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x as contiguous float32 [M, k] (what the kernels read)."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k or not x.is_contiguous():
        raise ValueError(
            f"the kernels take contiguous float32 [M, {k}] inputs, got {x.dtype} {tuple(x.shape)}"
        )
    return x


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if w.dtype != dtype or not w.is_contiguous() or w.shape[1] % K_MULTIPLE:
        raise ValueError(f"the kernel takes a contiguous {dtype} weight [N, K], K % {K_MULTIPLE} == 0")
    return w


def gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 times bf16 w [N, K] transposed: float32 [M, N]."""
    n, k = _weight(w, torch.bfloat16).shape
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    _library().loom_gemv_bf16(
        _ptr(_rows(x, k)), _ptr(w), None, _ptr(out), x.shape[0], n, k, torch.get_num_threads()
    )
    return out


def gemv_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 times (int8 q [N, K] * float32 scales [N, 1]) transposed: float32 [M, N]."""
    n, k = _weight(q, torch.int8).shape
    if scales.dtype != torch.float32 or scales.shape != (n,) or not scales.is_contiguous():
        raise ValueError(f"the int8 kernel takes contiguous float32 scales [{n}]")
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    _library().loom_gemv_int8(
        _ptr(_rows(x, k)), _ptr(q), _ptr(scales), _ptr(out), x.shape[0], n, k, torch.get_num_threads()
    )
    return out
