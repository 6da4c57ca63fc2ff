"""GrammarMatcher: accept, reject without harm, roll back, fork, terminate on EOS; MaskFiller fills a batch
exactly as row-by-row filling does."""

from __future__ import annotations

import pytest
import torch
from grammar_schemas import SCHEMAS
from grammar_walk import walk

from loom.engine.structured import GrammarSpec, MaskFiller, allocate_bitmask


@pytest.fixture(scope="module")
def plan_grammar(compiler):
    return compiler.compile(GrammarSpec.json_schema(SCHEMAS["pydantic_like"], param="response_format"))


def _mask(matcher, vocab_size: int) -> torch.Tensor:
    bitmask = allocate_bitmask(1, vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    return bitmask[0].clone()


def _allowed(mask: torch.Tensor) -> list[int]:
    bits = (mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten().nonzero().flatten().tolist()


def test_rollback_restores_every_earlier_state(plan_grammar, compiler, closers):
    tokens = walk(plan_grammar.matcher(), compiler.vocab_size, closers, seed=3)
    matcher = plan_grammar.matcher()
    masks = [_mask(matcher, compiler.vocab_size)]
    for token in tokens:
        assert matcher.accept_token(token)
        masks.append(_mask(matcher, compiler.vocab_size))
    assert matcher.is_terminated and matcher.num_tokens == len(tokens)
    for k in (1, 2, 5, len(tokens) // 2):
        matcher.rollback(k)
        assert torch.equal(_mask(matcher, compiler.vocab_size), masks[len(tokens) - k])
        assert not matcher.is_terminated
        assert matcher.accept_tokens(tokens[len(tokens) - k :]) == k  # and forward again, the same way
        assert torch.equal(_mask(matcher, compiler.vocab_size), masks[-1])
    matcher.rollback(len(tokens))
    assert torch.equal(_mask(matcher, compiler.vocab_size), masks[0])


def test_rollback_past_the_start_is_refused(plan_grammar):
    matcher = plan_grammar.matcher()
    assert matcher.accept_token(matcher_first_token(plan_grammar))
    with pytest.raises(ValueError):
        matcher.rollback(2)
    assert matcher.num_tokens == 1 and matcher.error is None


def matcher_first_token(grammar) -> int:
    return _allowed(_mask(grammar.matcher(), 2048))[0]


def test_illegal_token_is_refused_and_leaves_the_state(plan_grammar, tokenizer, compiler):
    matcher = plan_grammar.matcher()
    before = _mask(matcher, compiler.vocab_size)
    (bad,) = tokenizer.encode("]", add_special_tokens=False)
    assert bad not in _allowed(before)
    assert not matcher.accept_token(bad)
    assert matcher.error is None and matcher.num_tokens == 0
    assert torch.equal(_mask(matcher, compiler.vocab_size), before)
    assert matcher.validate_tokens(tokenizer.encode('{"goal": "x', add_special_tokens=False) + [bad]) >= 2


def test_fork_is_independent(plan_grammar, compiler, closers):
    tokens = walk(plan_grammar.matcher(), compiler.vocab_size, closers, seed=1)
    matcher = plan_grammar.matcher()
    half = len(tokens) // 2
    assert matcher.accept_tokens(tokens[:half]) == half
    fork = matcher.fork()
    at_fork = _mask(matcher, compiler.vocab_size)
    assert fork.num_tokens == half and torch.equal(_mask(fork, compiler.vocab_size), at_fork)
    assert fork.accept_tokens(tokens[half:]) == len(tokens) - half and fork.is_terminated
    assert torch.equal(_mask(matcher, compiler.vocab_size), at_fork) and not matcher.is_terminated


def test_each_eos_id_ends_a_complete_output(compiler, tokenizer):
    grammar = compiler.compile(GrammarSpec.choice(["yes", "yes please"], param="guided_choice"))
    eos = sorted(tokenizer.eos_token_ids)
    assert len(eos) == 2  # <|im_end|> and <|endoftext|>: both must be allowed and accepted
    for eos_id in eos:
        matcher = grammar.matcher()
        assert not set(eos) & set(_allowed(_mask(matcher, compiler.vocab_size)))  # nothing matched yet
        assert matcher.accept_tokens(tokenizer.encode("yes", add_special_tokens=False)) > 0
        assert matcher.is_accepting and not matcher.is_terminated  # " please" may still follow
        assert set(eos) <= set(_allowed(_mask(matcher, compiler.vocab_size)))
        assert matcher.accept_token(eos_id) and matcher.is_terminated


def test_a_finished_output_allows_only_eos(compiler, tokenizer):
    matcher = compiler.compile(GrammarSpec.choice(["done"], param="guided_choice")).matcher()
    assert matcher.accept_tokens(tokenizer.encode("done", add_special_tokens=False)) > 0
    assert matcher.is_terminated and matcher.is_accepting
    assert set(_allowed(_mask(matcher, compiler.vocab_size))) == tokenizer.eos_token_ids


def test_mask_filler_matches_row_by_row(plan_grammar, compiler, closers):
    matchers = []
    for seed in range(6):
        tokens = walk(plan_grammar.matcher(), compiler.vocab_size, closers, seed=seed)
        matcher = plan_grammar.matcher()
        matcher.accept_tokens(tokens[: seed * len(tokens) // 6])
        matchers.append(matcher)
    rows = [0, 2, 3, 5, 6, 9]
    batch = allocate_bitmask(10, compiler.vocab_size)
    batch.zero_()
    MaskFiller(num_threads=2).fill(list(zip(matchers, rows, strict=True)), batch)
    for matcher, row in zip(matchers, rows, strict=True):
        assert torch.equal(batch[row], _mask(matcher, compiler.vocab_size))
    for row in set(range(10)) - set(rows):
        assert not batch[row].any()  # rows without a matcher are left alone
