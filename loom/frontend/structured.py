"""The frontend's side of structured output: one engine's grammar compiler, and the little the frontend
decides about grammars (which tool-call format a model writes, bad words as token sequences).

The compiler needs llguidance's view of the tokenizer, which takes 0.1 s at a 2k vocabulary and ~10 s at
151k to build, so it is made on the first request that brings a grammar, off the event loop (the server
compiles with `compile_async`, which waits without blocking the loop; `LLM` and the agent's in-process
client call `compile` from their own threads). Compiles are bounded in time and cached (see
loom/engine/structured/compiler.py).
"""

from __future__ import annotations

import asyncio
import threading

from loom.engine.structured import (
    CompiledGrammar,
    CompilerConfig,
    GrammarCompiler,
    GrammarSpec,
    from_structured_outputs,
)
from loom.errors import InvalidRequest
from loom.frontend.tool_parsers import HERMES_START
from loom.tokenizer import Tokenizer


class GrammarFrontend:
    """Compiles the grammars of one engine's requests (tokenizer and logits width of that engine)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, config: CompilerConfig | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.config = config or CompilerConfig()
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def compiler(self) -> GrammarCompiler:
        """The compiler, made on first use (seconds at a large vocabulary: call it off the event loop)."""
        with self._lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.config)
            return self._compiler

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile (or fetch) spec, waiting at most the time bound; InvalidRequest names its field."""
        return self.compiler().compile(spec)

    async def compile_async(self, spec: GrammarSpec) -> CompiledGrammar:
        compiler = self._compiler or await asyncio.to_thread(self.compiler)
        return await compiler.compile_async(spec)

    def from_params(self, structured_outputs: dict) -> CompiledGrammar:
        """SamplingParams.structured_outputs (vLLM's form) compiled."""
        return self.compile(from_structured_outputs(structured_outputs))

    def close(self) -> None:
        if self._compiler is not None:
            self._compiler.close()


def tool_format(tokenizer: Tokenizer, parser: str) -> str:
    """How the model writes tool calls, for a tool-call grammar: the server's --tool-call-parser, or under
    auto, hermes when the chat template shows `<tool_call>` tags and GLM-4's `name\\n{json}` otherwise."""
    if parser in ("hermes", "glm4"):
        return parser
    if parser == "none":
        raise InvalidRequest(
            "tool_choice cannot force a tool call: this server reads no tool calls (--tool-call-parser none)",
            param="tool_choice",
        )
    template = tokenizer.hf.chat_template
    sources = template.values() if isinstance(template, dict) else [template or ""]
    return "hermes" if any(HERMES_START in source for source in sources) else "glm4"


def bad_words_token_ids(tokenizer: Tokenizer, words: list[str]) -> list[list[int]]:
    """Each word's tokens, alone and after a space (as it appears mid-sentence), as vLLM does."""
    sequences: list[list[int]] = []
    for word in words:
        for text in (word, " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences
