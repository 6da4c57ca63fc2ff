"""Architecture name (config.json `architectures[0]`) -> model class."""

from __future__ import annotations

from torch import nn

from loom.errors import ModelLoadError
from loom.models.glm import Glm4ForCausalLM, GlmForCausalLM
from loom.models.glm4v import Glm4vForConditionalGeneration
from loom.models.llama import LlamaForCausalLM
from loom.models.qwen2 import Qwen2ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "GlmForCausalLM": GlmForCausalLM,
    "Glm4ForCausalLM": Glm4ForCausalLM,
    "Glm4vForConditionalGeneration": Glm4vForConditionalGeneration,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODELS[architecture]
    except KeyError:
        raise ModelLoadError(
            f"architecture {architecture!r} is not supported; loom runs {', '.join(sorted(MODELS))}"
        ) from None
