"""Images for vision-language models: loading them safely from request URLs (media.py, fetch.py) and
preprocessing them the way the checkpoint's processor config says (processor.py)."""

from loom.multimodal.media import LoadedImage, MediaConfig, decode_image, load_image
from loom.multimodal.processor import (
    ImageProcessor,
    ImageProcessorConfig,
    ProcessedImage,
    expand_image_tokens,
    placeholder_ranges,
    smart_resize,
)

__all__ = [
    "ImageProcessor",
    "ImageProcessorConfig",
    "LoadedImage",
    "MediaConfig",
    "ProcessedImage",
    "decode_image",
    "expand_image_tokens",
    "load_image",
    "placeholder_ranges",
    "smart_resize",
]
