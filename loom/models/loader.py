"""Load an HF-format checkpoint directory into our model classes.

Tensors are read memory-mapped with safetensors' safe_open, one at a time, converted to the target dtype
once and copied into parameters allocated directly on the target device. Never touches the network.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from loom.errors import ModelLoadError
from loom.layers.quant import LinearMethod, linear_method, lm_head_method, process_linears, weight_bytes
from loom.layers.quant.checkpoint import SUFFIXES, CheckpointQuantization
from loom.models.config import ModelConfig
from loom.models.registry import model_class

logger = logging.getLogger(__name__)

# Buffers some checkpoints carry that we recompute ourselves.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / name for name in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{index} names weight files that do not exist: {[f.name for f in missing]}")
    return files


def load_model(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str | None = None,
    group_size: int = 128,
    reference: bool = False,
    lm_head: LinearMethod | None = None,
) -> nn.Module:
    """Build the model, load the float checkpoint, then let every linear's method process its weight once
    (quantize, or prepack): the float copies are freed as each layer is converted. `reference` gives each
    linear its method's plain-PyTorch twin instead (for tests); `lm_head` overrides the output projection's
    method (for benchmarks that measure the choice)."""
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    cls = model_class(cfg.architecture)
    if cfg.quantization is not None:
        quantization, group_size = cfg.quantization.resolve(quantization, group_size)
        logger.info(
            "%s int4 checkpoint (group %d): its 4-bit values load as they are",
            cfg.quantization.method,
            group_size,
        )
    # Checked before anything is allocated, so a device or dtype that cannot run it fails at once.
    method = linear_method(quantization, group_size, dtype, torch.device(device))
    with _default_dtype(dtype), torch.device(device):
        model = cls(cfg)
    load_weights(model, path, dtype, cfg.quantization)
    before = weight_bytes(model)
    lm_head = lm_head or lm_head_method(quantization, method)
    counts = process_linears(model, method, lm_head, reference=reference)
    logger.info(
        "linear methods %s; weights %.1f MiB -> %.1f MiB", counts, before / 2**20, weight_bytes(model) / 2**20
    )
    return model.eval()


def load_weights(
    model: nn.Module, path: Path, dtype: torch.dtype, quantized: CheckpointQuantization | None = None
) -> None:
    """Copy every checkpoint tensor into its parameter. A GPTQ / AWQ checkpoint's (`quantized`) packed
    linears are decoded into loom's int4 values and kept on the layer (`prequantized`, by shard) for its
    Int4 method (_load_quantized)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules", {})
    prefixes = getattr(model, "checkpoint_prefixes", ())
    tied = model.config.tie_word_embeddings
    # Each parameter's loaded shards; a packed parameter is complete when all its shards arrived.
    loaded: dict[str, set] = {}
    # (weight parameter, shard) -> the quantized linear's packed tensors, by suffix
    packed_linears: dict[tuple[str, object], dict[str, torch.Tensor]] = {}
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                base, _, suffix = name.rpartition(".")
                if quantized is not None and suffix in SUFFIXES:
                    key = _map_name(_rename(base + ".weight", prefixes), packed)
                    packed_linears.setdefault(key, {})[suffix] = f.get_tensor(name)
                    continue
                target, shard_id = _map_name(_rename(name, prefixes), packed)
                param = params.get(target)
                if param is None:
                    raise ModelLoadError(
                        f"{file.name}: tensor {name!r} has no place in {type(model).__name__}"
                    )
                tensor = f.get_tensor(name).to(dtype)
                loader = getattr(param, "weight_loader", None)
                try:
                    if loader is not None:
                        loader(param, tensor, shard_id)
                    elif param.shape != tensor.shape:
                        raise ValueError(
                            f"shape {tuple(tensor.shape)} does not match the model's {tuple(param.shape)}"
                        )
                    else:
                        param.data.copy_(tensor)
                except ValueError as e:
                    raise ModelLoadError(f"{file.name}: tensor {name!r}: {e}") from e
                loaded.setdefault(target, set()).add(shard_id)
    for (target, shard_id), tensors in packed_linears.items():
        _load_quantized(model, params.get(target), target, shard_id, quantized.decode(tensors, target))
        loaded.setdefault(target, set()).add(shard_id)
    _check_complete(model, params, loaded, tied, path)


def _load_quantized(model: nn.Module, param, target: str, shard_id, values: tuple) -> None:
    """One GPTQ / AWQ linear (or shard) decoded into loom's int4 `values` (q, scale, zero), kept on its
    layer for Int4. The float weight is left unwritten (its pages never become resident, so a quantized
    model loads in about its quantized size); a method that needs it fills it (`process_linears`)."""
    if param is None:
        raise ModelLoadError(f"quantized linear {target!r} has no place in {type(model).__name__}")
    module = model.get_submodule(target.rsplit(".", 1)[0])
    shards = getattr(module, "shards", None)
    if shard_id is not None and (shards is None or shard_id not in shards):
        raise ModelLoadError(f"quantized linear {target!r}: the model's layer has no shard {shard_id!r}")
    rows = param.shape[0] if shard_id is None else shards[shard_id][1]
    if tuple(values[0].shape) != (rows, param.shape[1]):
        raise ModelLoadError(
            f"quantized linear {target!r}: {tuple(values[0].shape)} weights do not match the model's "
            f"{(rows, param.shape[1])}" + ("" if shard_id is None else f" for shard {shard_id!r}")
        )
    if not hasattr(module, "prequantized"):
        module.prequantized = {}
    module.prequantized[shard_id] = values


def _rename(name: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    """Apply a model's `checkpoint_prefixes` ((old, new) pairs, first match wins) to a tensor name."""
    for old, new in prefixes:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _map_name(name: str, packed: dict[str, tuple[str, object]]) -> tuple[str, object]:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            module, shard_id = packed[part]
            return ".".join(parts[:i] + [module] + parts[i + 1 :]), shard_id
    return name, None


def _check_complete(model: nn.Module, params: dict, loaded: dict[str, set], tied: bool, path: Path) -> None:
    missing = []
    for name in params:
        if tied and name == "lm_head.weight":
            continue
        got = loaded.get(name)
        module = model.get_submodule(name.rsplit(".", 1)[0])
        shards = getattr(module, "shards", None)
        if got is None or (None not in got and shards is not None and set(shards) != got):
            want = "all of" if got is None else f"shards {sorted(map(str, set(shards) - got))} of"
            missing.append(f"{want} {name}")
    if missing:
        raise ModelLoadError(
            f"{path}: checkpoint is missing {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")
        )
