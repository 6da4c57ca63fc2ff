"""GLM-4.1V image preprocessing, as the checkpoint's `preprocessor_config.json` says: resize to multiples of
patch x merge (28 pixels) within [min_pixels, max_pixels], rescale to [0, 1], normalize, repeat the still
image over the 2 frames of a temporal patch, and cut it into patches in the vision tower's order.

The output is bit-identical to transformers' `Glm4vImageProcessor` (its PIL backend): the same Pillow
bicubic resize on uint8 pixels, the same float64 rescale cast to float32, the same float32 normalize.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from loom.errors import InvalidRequest, ModelLoadError
from loom.multimodal.media import LoadedImage

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ImageProcessorConfig:
    """GLM-4.1V's image preprocessing; defaults are transformers' `Glm4vImageProcessor` defaults."""

    min_pixels: int = 112 * 112
    """Smallest (temporal patch x height x width) after resizing (`size.shortest_edge` in the file)."""
    max_pixels: int = 28 * 28 * 15000
    """Largest (temporal patch x height x width) after resizing (`size.longest_edge`): a still image
    counts twice, since it fills both frames of a temporal patch."""
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = int(Image.Resampling.BICUBIC)
    """Pillow resampling filter (3: bicubic)."""

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidRequest(
                    f"{name} must be a positive integer, got {getattr(self, name)!r}", param=name
                )
        if self.min_pixels > self.max_pixels:
            raise InvalidRequest(
                f"min_pixels {self.min_pixels} is above max_pixels {self.max_pixels}", param="min_pixels"
            )

    @property
    def factor(self) -> int:
        """Side lengths are multiples of this: one merged image token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dir(cls, path: str | Path, overrides: dict | None = None) -> ImageProcessorConfig:
        """Read `preprocessor_config.json`, then apply `overrides` (vLLM's --mm-processor-kwargs:
        `max_pixels`, `min_pixels`, or any field above)."""
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            raise ModelLoadError(f"{file} not found: an image model needs its preprocessor config")
        return cls.from_dict(json.loads(file.read_text()), overrides)

    @classmethod
    def from_dict(cls, d: dict, overrides: dict | None = None) -> ImageProcessorConfig:
        d = dict(d)
        size = d.pop("size", None) or {}
        if "shortest_edge" in size:
            d.setdefault("min_pixels", size["shortest_edge"])
        if "longest_edge" in size:
            d.setdefault("max_pixels", size["longest_edge"])
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        config = cls(**kwargs)
        if overrides:
            unknown = sorted(set(overrides) - names)
            if unknown:
                raise InvalidRequest(
                    f"unknown image processor option(s) {unknown}; known: {sorted(names)}",
                    param="mm_processor_kwargs",
                )
            config = replace(config, **overrides)
        return config


@dataclass(frozen=True)
class ProcessedImage:
    """One image, ready for the vision tower."""

    pixel_values: torch.Tensor = field(repr=False)
    """[t * h * w, channels * temporal_patch * patch * patch] float32, in the vision tower's patch order."""
    grid_thw: tuple[int, int, int]
    """The grid in patches: (frames / temporal_patch, height / patch, width / patch)."""
    num_tokens: int
    """Placeholder tokens the image takes in the prompt (one per merge x merge patches)."""
    content_hash: str
    """The decoded image's hash (LoadedImage.content_hash): the encoder- and prefix-cache key."""


def smart_resize(
    height: int, width: int, config: ImageProcessorConfig, param: str = "image"
) -> tuple[int, int]:
    """(height, width) to resize to: multiples of config.factor, aspect ratio kept as well as that allows,
    temporal_patch x height x width within [min_pixels, max_pixels] (as transformers' GLM-4.1V)."""
    factor, frames = config.factor, config.temporal_patch_size
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InvalidRequest(
            f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 is over {MAX_ASPECT_RATIO}:1",
            param=param,
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if frames * h_bar * w_bar > config.max_pixels:
        beta = math.sqrt(frames * height * width / config.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif frames * h_bar * w_bar < config.min_pixels:
        beta = math.sqrt(config.min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class ImageProcessor:
    def __init__(self, config: ImageProcessorConfig):
        self.config = config
        # Rescale and normalize map each (channel, uint8 value) to one float32, so they are a 3 x 256 table:
        # computed with transformers' exact operations (float64 rescale, float32 cast, float32 normalize),
        # then applied as a gather: half the time of the arithmetic on a full-size screenshot.
        values = np.arange(256, dtype=np.uint8)[:, None].repeat(len(config.image_mean), axis=1)  # [256, C]
        if config.do_rescale:
            values = (values.astype(np.float64) * config.rescale_factor).astype(np.float32)
        if config.do_normalize:
            mean = np.array(config.image_mean, dtype=np.float32)
            std = np.array(config.image_std, dtype=np.float32)
            values = (values.astype(np.float32) - mean) / std
        self._table = np.ascontiguousarray(values.astype(np.float32).T)  # [C, 256]

    def grid(self, width: int, height: int, param: str = "image") -> tuple[int, int, int]:
        """The patch grid (t, h, w) of an image of this size, without decoding it."""
        cfg = self.config
        if cfg.do_resize:
            height, width = smart_resize(height, width, cfg, param)
        if height % cfg.factor or width % cfg.factor:
            raise InvalidRequest(
                f"image of {width}x{height} is not a multiple of {cfg.factor} pixels", param=param
            )
        if cfg.temporal_patch_size * height * width > cfg.max_pixels:
            # Only an extreme aspect ratio under a small max_pixels gets here: one side is at its minimum.
            raise InvalidRequest(
                f"image is still {width}x{height} after resizing, over max_pixels {cfg.max_pixels}",
                param=param,
            )
        return 1, height // cfg.patch_size, width // cfg.patch_size

    def num_tokens(self, width: int, height: int, param: str = "image") -> int:
        t, h, w = self.grid(width, height, param)
        return t * h * w // self.config.merge_size**2

    def __call__(self, image: LoadedImage, param: str = "image") -> ProcessedImage:
        cfg = self.config
        t, gh, gw = self.grid(image.image.width, image.image.height, param)
        pil = image.image
        if cfg.do_resize:
            pil = pil.resize((gw * cfg.patch_size, gh * cfg.patch_size), resample=cfg.resample)
        pixels = np.asarray(pil)  # [H, W, C] uint8
        pixels = np.stack([self._table[c][pixels[..., c]] for c in range(pixels.shape[-1])])  # [C, H, W]
        return ProcessedImage(
            torch.from_numpy(patchify(pixels, cfg)),
            (t, gh, gw),
            t * gh * gw // cfg.merge_size**2,
            image.content_hash,
        )


def patchify(pixels: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """[C, H, W] -> [h * w, C * T * P * P]: the still image repeated over the T frames of a temporal patch,
    patches ordered merge window by merge window (row-major), row-major inside each window."""
    c, height, width = pixels.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    x = np.broadcast_to(pixels, (tp, c, height, width))
    x = x.reshape(tp, c, gh // m, m, p, gw // m, m, p)
    # (T, C, gh/m, m, P, gw/m, m, P) -> (gh/m, gw/m, m, m, C, T, P, P)
    x = x.transpose(2, 5, 3, 6, 1, 0, 4, 7)
    return np.ascontiguousarray(x).reshape(gh * gw, c * tp * p * p)


def placeholder_ranges(token_ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each run of image placeholders in a prompt, in order: where each image's
    embeddings go (and which KV blocks each image's content hash belongs to)."""
    ranges: list[tuple[int, int]] = []
    start = None
    for i, token in enumerate([*token_ids, None]):
        if token == image_token_id and start is None:
            start = i
        elif token != image_token_id and start is not None:
            ranges.append((start, i - start))
            start = None
    return ranges


def expand_image_tokens(token_ids: Sequence[int], image_token_id: int, counts: Sequence[int]) -> list[int]:
    """The prompt with its i-th `image_token_id` repeated counts[i] times (the chat template writes one
    placeholder per image; the model needs one per image token)."""
    out: list[int] = []
    i = 0
    for token in token_ids:
        if token == image_token_id:
            if i >= len(counts):
                raise InvalidRequest(
                    f"the prompt has more image placeholders than the {len(counts)} images given"
                )
            out.extend([token] * counts[i])
            i += 1
        else:
            out.append(token)
    if i != len(counts):
        raise InvalidRequest(f"{len(counts)} images given but the prompt has {i} image placeholders")
    return out
