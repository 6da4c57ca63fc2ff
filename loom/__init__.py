"""loom: run LLM agents fast."""

from loom.config import EngineConfig
from loom.entrypoints.llm import LLM
from loom.outputs import CompletionOutput, RequestOutput
from loom.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
