"""A constrained random walk (imported as `grammar_walk`: this directory is on sys.path): sample among the
tokens a grammar allows until it terminates.

Random logits at temperature 1 (or uniform ones) stand in for a model. Past `soft_cap` tokens, tokens that
only close things (quotes, brackets, commas, EOS) get a large bonus on every other step, and single
punctuation characters on the steps between (the `@` and `.` an email needs before its closing quote), so
walks through open-ended strings and arrays end in a bounded number of steps; every token is still one the
grammar allows.
"""

from __future__ import annotations

import torch

from loom.engine.structured import CompiledGrammar, GrammarMatcher, allocate_bitmask, apply_bitmask
from loom.tokenizer import Tokenizer

CLOSERS = set('"}]),')


def closing_tokens(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """[2, vocab] float: the two bonuses past the soft cap: for EOS and tokens made of closing characters
    only, and for one other punctuation character (not an opening one)."""
    bonus = torch.zeros(2, vocab_size)
    for token_id in range(tokenizer.vocab_size):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if text and set(text) <= CLOSERS:
            bonus[0, token_id] = 30.0
        elif (
            len(text) == 1
            and text.isascii()
            and not text.isalnum()
            and not text.isspace()
            and text not in "{[("
        ):
            bonus[1, token_id] = 30.0
    bonus[0, sorted(tokenizer.eos_token_ids)] = 30.0
    return bonus


def walk(
    matcher: GrammarMatcher,
    vocab_size: int,
    closers: torch.Tensor,
    seed: int,
    uniform: bool = False,
    soft_cap: int = 48,
    hard_cap: int = 2048,
) -> list[int]:
    """Token ids of one walk from matcher's state (EOS included when sampled)."""
    gen = torch.Generator().manual_seed(seed)
    bitmask = allocate_bitmask(1, vocab_size)
    tokens: list[int] = []
    while not matcher.is_terminated and len(tokens) < hard_cap:
        matcher.fill_bitmask(bitmask, 0)
        logits = torch.zeros(1, vocab_size) if uniform else torch.randn(1, vocab_size, generator=gen)
        if len(tokens) >= soft_cap:
            logits[0] += closers[int(torch.randint(2, (), generator=gen))]
        apply_bitmask(logits, bitmask)
        token = int(torch.multinomial(logits.softmax(-1)[0], 1, generator=gen))
        assert matcher.accept_token(token), f"the grammar refused a token its own mask allowed: {token}"
        tokens.append(token)
    assert matcher.is_terminated, f"walk did not terminate in {hard_cap} tokens"
    return tokens


def walk_text(compiled: CompiledGrammar, tokenizer: Tokenizer, closers: torch.Tensor, seed: int, **kw) -> str:
    tokens = walk(compiled.matcher(), closers.shape[1], closers, seed, **kw)
    return tokenizer.decode(tokens, skip_special_tokens=True)
