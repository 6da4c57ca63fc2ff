"""Structured output: grammars a request's output must match, compiled once, applied as token masks.

spec.py (what is constrained) <- requests.py (from request fields); compiler.py (spec -> compiled grammar,
off the engine thread, cached); matcher.py (per-sequence state, masks); bitmask.py (masks -> logits).
The library underneath is llguidance; README.md says why.
"""

from loom.engine.structured.bitmask import allocate_bitmask, apply_bitmask, apply_bitmask_ref, bitmask_words
from loom.engine.structured.compiler import CompiledGrammar, CompilerConfig, GrammarCompiler
from loom.engine.structured.matcher import GrammarMatcher, MaskFiller
from loom.engine.structured.requests import (
    from_guided_fields,
    from_response_format,
    from_structured_outputs,
    request_grammar,
    tool_call_spec,
)
from loom.engine.structured.spec import GrammarSpec, SpecLimits, ToolFunction

__all__ = [
    "CompiledGrammar",
    "CompilerConfig",
    "GrammarCompiler",
    "GrammarMatcher",
    "GrammarSpec",
    "MaskFiller",
    "SpecLimits",
    "ToolFunction",
    "allocate_bitmask",
    "apply_bitmask",
    "apply_bitmask_ref",
    "bitmask_words",
    "from_guided_fields",
    "from_response_format",
    "from_structured_outputs",
    "request_grammar",
    "tool_call_spec",
]
