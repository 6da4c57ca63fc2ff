"""Speculative decoding without a draft model: proposers that guess the next tokens from text the
request (or its agent program) has already seen, verified by the target model in one forward.

Agents copy: tool outputs quoted back, JSON edited in place, code rewritten with small changes. A guess
that is right costs one forward for several tokens; one that is wrong costs the verification of its
tokens, which on a memory-bound decode step is close to free, and the adaptive controller stops
guessing for a request whose guesses keep failing.
"""

from loom.engine.spec_decode.config import SpeculativeConfig
from loom.engine.spec_decode.proposer import Proposer, make_proposer

__all__ = ["Proposer", "SpeculativeConfig", "make_proposer"]
