"""GLM-4.1V preprocessing against transformers' Glm4vImageProcessor (its PIL backend, which is what
`Glm4vImageProcessor` resolves to without torchvision): bit-identical pixel_values and grids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, Glm4vImageProcessorPil
from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize as hf_smart_resize

from loom.errors import InvalidRequest
from loom.multimodal import (
    ImageProcessor,
    ImageProcessorConfig,
    LoadedImage,
    expand_image_tokens,
    placeholder_ranges,
)
from loom.multimodal.processor import smart_resize

GLM41V_CONFIG = {
    "size": {"shortest_edge": 12544, "longest_edge": 9633792},
    "do_rescale": True,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Glm4vImageProcessor",
    "processor_class": "Glm4vProcessor",
}
# (width, height): a phone screenshot, square, wide, tall and thin, tiny (upscaled), odd sizes.
SIZES = [(1080, 2400), (224, 224), (1920, 1080), (60, 1000), (20, 30), (333, 517), (3000, 45)]


def loaded(w: int, h: int, seed: int = 0) -> LoadedImage:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return LoadedImage(Image.fromarray(pixels), f"hash-{w}x{h}")


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("processor")
    (d / "preprocessor_config.json").write_text(json.dumps(GLM41V_CONFIG))
    return d


@pytest.mark.parametrize("max_pixels", [None, 5_000_000, 200_000])
def test_matches_transformers_exactly(config_dir, max_pixels):
    overrides = {"max_pixels": max_pixels} if max_pixels else None
    ours = ImageProcessor(ImageProcessorConfig.from_dir(config_dir, overrides))
    size = dict(GLM41V_CONFIG["size"], **({"longest_edge": max_pixels} if max_pixels else {}))
    hf = Glm4vImageProcessorPil.from_pretrained(config_dir, size=size)
    for i, (w, h) in enumerate(SIZES):
        image = loaded(w, h, seed=i)
        got = ours(image)
        ref = hf(images=[image.image], return_tensors="pt")
        assert [list(got.grid_thw)] == ref["image_grid_thw"].tolist(), (w, h)
        assert got.pixel_values.dtype == ref["pixel_values"].dtype == torch.float32
        assert torch.equal(got.pixel_values, ref["pixel_values"]), (w, h)
        t, gh, gw = got.grid_thw
        assert got.num_tokens == t * gh * gw // 4 == ours.num_tokens(w, h)
        assert got.num_tokens * 4 == hf.get_number_of_image_patches(h, w)
        assert 2 * gh * gw * 14 * 14 <= (max_pixels or 9633792)
        assert got.content_hash == image.content_hash


def test_auto_image_processor_reads_the_same_config(config_dir):
    hf = AutoImageProcessor.from_pretrained(config_dir)
    ours = ImageProcessorConfig.from_dir(config_dir)
    assert (ours.min_pixels, ours.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge)
    assert ours.image_mean == tuple(hf.image_mean) and ours.factor == 28


def test_max_pixels_budget_counts_both_frames():
    """A still image fills both frames of a temporal patch, so max_pixels bounds 2 x height x width (the
    checkpoint's rule; Open-AutoGLM's max_pixels of 5,000,000 keeps a 1080x2400 screenshot below 2.5 MP)."""
    config = ImageProcessorConfig(min_pixels=12544, max_pixels=5_000_000)
    h, w = smart_resize(2400, 1080, config)
    assert (h, w) == hf_smart_resize(2, 2400, 1080, 2, 28, 12544, 5_000_000) == (2352, 1036)
    assert 2 * h * w <= 5_000_000 < 2 * (h + 28) * (w + 28)


def test_refusals(config_dir):
    with pytest.raises(InvalidRequest, match="aspect ratio") as err:
        ImageProcessor(ImageProcessorConfig())(loaded(6000, 28), param="messages[1].content[0].image_url")
    assert err.value.param == "messages[1].content[0].image_url"
    # An extreme shape under a small budget stays over max_pixels even at its smallest allowed size.
    tight = ImageProcessor(ImageProcessorConfig(min_pixels=1568, max_pixels=4704))
    with pytest.raises(InvalidRequest, match="over max_pixels 4704"):
        tight.grid(3000, 30)
    with pytest.raises(InvalidRequest, match="unknown image processor option") as err:
        ImageProcessorConfig.from_dir(config_dir, {"max_pixel": 5})
    assert err.value.param == "mm_processor_kwargs"
    with pytest.raises(InvalidRequest, match="min_pixels"):
        ImageProcessorConfig.from_dir(config_dir, {"max_pixels": 1000})


def test_expand_image_tokens_and_find_them_again():
    expanded = expand_image_tokens([1, 9, 2, 9, 3], 9, [2, 3])
    assert expanded == [1, 9, 9, 2, 9, 9, 9, 3]
    assert placeholder_ranges(expanded, 9) == [(1, 2), (4, 3)]
    assert placeholder_ranges([9, 9], 9) == [(0, 2)] and placeholder_ranges([1, 2], 9) == []
    with pytest.raises(InvalidRequest, match="2 images given but the prompt has 1"):
        expand_image_tokens([9, 1], 9, [4, 4])
    with pytest.raises(InvalidRequest, match="more image placeholders"):
        expand_image_tokens([9, 1, 9], 9, [4])
