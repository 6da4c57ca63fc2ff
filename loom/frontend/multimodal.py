"""Images in a request -> what the engine needs: each `image_url` part of a chat message is loaded (with the
URL policy of loom.multimodal.media), preprocessed as the checkpoint says, shown to the chat template as
the model's image placeholder, expanded to one placeholder token per image embedding, and placed: the
prompt's M-RoPE positions and an ImageInput per image at its run of placeholders.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loom.errors import InvalidRequest
from loom.models.config import ModelConfig
from loom.multimodal.inputs import ImageInput
from loom.multimodal.media import LoadedImage, MediaConfig, decode_image, load_image
from loom.multimodal.processor import (
    ImageProcessor,
    ImageProcessorConfig,
    ProcessedImage,
    expand_image_tokens,
    placeholder_ranges,
)
from loom.tokenizer import Tokenizer

CONTENT_FORMATS = ("auto", "string", "openai")
IMAGE_PART_TYPES = ("image_url", "image")
DEFAULT_IMAGE_LIMIT = 16


def parse_json_option(value: str | dict | None, name: str) -> dict:
    """A JSON-object flag (--limit-mm-per-prompt, --mm-processor-kwargs), given as text or a dict."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"{name} is not valid JSON: {e}", param=name) from e
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name} must be a JSON object", param=name)
    return value


def image_limit(value: str | dict | None) -> int:
    limits = parse_json_option(value, "limit_mm_per_prompt")
    unknown = sorted(set(limits) - {"image"})
    if unknown:
        raise InvalidRequest(
            f"limit_mm_per_prompt: only 'image' is supported, got {unknown}", "limit_mm_per_prompt"
        )
    limit = limits.get("image", DEFAULT_IMAGE_LIMIT)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise InvalidRequest(
            f"limit_mm_per_prompt.image must be an integer >= 0, got {limit!r}", "limit_mm_per_prompt"
        )
    return limit


def has_image_parts(messages: Sequence[dict]) -> bool:
    return any(
        isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in m["content"])
        for m in messages
    )


class MultimodalProcessor:
    """The image side of the InputProcessor, for a model that takes images (GLM-4.1V)."""

    def __init__(
        self,
        model_dir: str | Path,
        model_config: ModelConfig,
        tokenizer: Tokenizer,
        media: MediaConfig | None = None,
        limit_per_prompt: int = DEFAULT_IMAGE_LIMIT,
        processor_overrides: dict | None = None,
        content_format: str = "auto",
    ):
        if content_format not in CONTENT_FORMATS:
            raise InvalidRequest(
                f"chat_template_content_format must be one of {CONTENT_FORMATS}, got {content_format!r}",
                param="chat_template_content_format",
            )
        cfg = model_config
        self.processor = ImageProcessor(ImageProcessorConfig.from_dir(model_dir, processor_overrides))
        self.media = media or MediaConfig()
        self.limit = limit_per_prompt
        self.image_token_id = cfg.image_token_id
        self.merge_size = cfg.vision.spatial_merge_size
        ids = [
            i for i in (cfg.image_start_token_id, cfg.image_token_id, cfg.image_end_token_id) if i is not None
        ]
        self.placeholder = tokenizer.decode(ids, skip_special_tokens=False)
        """The text the chat template writes for one image (before expansion)."""
        if content_format == "auto":
            template = tokenizer.hf.chat_template or ""
            if isinstance(template, dict):
                template = template.get("default", "")
            # A template that walks a message's content parts takes them as they are (vLLM's "openai");
            # one that prints the content whole needs a string with the placeholders in it.
            content_format = (
                "openai" if "in msg.content" in template or "in message.content" in template else "string"
            )
        self.content_format = content_format

    # ---- chat messages --------------------------------------------------------------------------

    def prepare_messages(self, messages: list[dict]) -> tuple[list[dict], list[ProcessedImage]]:
        """Load and preprocess every image part (in order) and rewrite the messages for the template."""
        images: list[ProcessedImage] = []
        out = []
        for i, message in enumerate(messages):
            content = message.get("content")
            if not isinstance(content, list):
                out.append(message)
                continue
            parts, texts, count = [], [], 0
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in IMAGE_PART_TYPES:
                    param = f"messages[{i}].content[{j}].image_url"
                    if message.get("role") != "user":
                        raise InvalidRequest(
                            f"an image may only be sent in a user message, not in a {message.get('role')!r} one",
                            param=param,
                        )
                    if len(images) >= self.limit:
                        raise InvalidRequest(
                            f"more than {self.limit} images in one prompt (--limit-mm-per-prompt)",
                            param="messages",
                        )
                    images.append(
                        self.processor(load_image(_image_url(part, param), self.media, param), param)
                    )
                    parts.append({"type": "image"})
                    count += 1
                else:
                    parts.append(part)
                    if kind == "text":
                        texts.append(part.get("text", ""))
            if self.content_format == "string":
                # vLLM's "string" format: the placeholders first, one per line, then the text parts.
                content = (
                    "\n".join([self.placeholder] * count + ["\n".join(texts)]) if count else "\n".join(texts)
                )
                out.append({**message, "content": content})
            else:
                out.append({**message, "content": parts})
        return out, images

    # ---- token ids -> engine inputs ---------------------------------------------------------------

    def extra_tokens(self, images: Sequence[ProcessedImage]) -> int:
        """How many tokens expanding the placeholders adds to the rendered prompt."""
        return sum(im.num_tokens - 1 for im in images)

    def finalize(self, token_ids: list[int], images: Sequence[ProcessedImage]):
        """(expanded ids, ImageInputs, [3, n] M-RoPE positions or None, delta)."""
        from loom.models.glm4v import mrope_positions

        if not images:
            if self.image_token_id in token_ids:
                raise InvalidRequest(
                    "the prompt holds an image placeholder but no image was sent", "messages"
                )
            return token_ids, (), None, 0
        ids = expand_image_tokens(token_ids, self.image_token_id, [im.num_tokens for im in images])
        runs = placeholder_ranges(ids, self.image_token_id)
        inputs = tuple(
            ImageInput(im.content_hash, im.pixel_values, im.grid_thw, start, length)
            for im, (start, length) in zip(images, runs, strict=True)
        )
        positions, delta = mrope_positions(
            ids, [im.grid_thw for im in images], self.image_token_id, self.merge_size
        )
        return ids, inputs, positions, delta

    def load(self, image: Any, param: str) -> ProcessedImage:
        """An image given to the offline API: a PIL image, bytes, or a data:/file:/http(s) URL."""
        from PIL import Image

        if isinstance(image, LoadedImage):
            loaded = image
        elif isinstance(image, Image.Image):
            import io

            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            loaded = decode_image(buffer.getvalue(), self.media, param)
        elif isinstance(image, bytes):
            loaded = decode_image(image, self.media, param)
        elif isinstance(image, str):
            loaded = load_image(image, self.media, param)
        else:
            raise InvalidRequest(
                f"an image must be a PIL image, bytes or a URL, got {type(image).__name__}", param
            )
        return self.processor(loaded, param)


def _image_url(part: dict, param: str) -> str:
    value = part.get("image_url", part.get("image"))
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise InvalidRequest(
            "an image part needs image_url.url (a data: URL, or an allowed file/http URL)", param
        )
    return url
