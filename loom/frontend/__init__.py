"""The frontend: everything between a caller's request and the engine's token ids, shared by the server,
`LLM` and the agent runtime. The InputProcessor renders, tokenizes, truncates and validates once and
makes EngineRequests; the OutputProcessor turns the engine's token ids back into text deltas, applies stop
strings and gathers the n sequences of a request into one RequestOutput."""

from loom.frontend.input_processor import InputProcessor, ProcessedRequest
from loom.frontend.output_processor import OutputProcessor, ProcessedOutputs

__all__ = ["InputProcessor", "OutputProcessor", "ProcessedOutputs", "ProcessedRequest"]
