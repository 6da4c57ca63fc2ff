"""apply_bitmask (byte-table fast path) against apply_bitmask_ref (its plain twin): equal on random masks,
row subsets, vocab sizes off a multiple of 32 and logits padded past the mask."""

from __future__ import annotations

import pytest
import torch

from loom.engine.structured import allocate_bitmask, apply_bitmask, apply_bitmask_ref, bitmask_words


def _random_mask(rows: int, mask_vocab: int, gen: torch.Generator, density: float) -> torch.Tensor:
    bits = torch.rand(rows, bitmask_words(mask_vocab) * 32, generator=gen) < density  # [rows, words * 32]
    weights = 2 ** torch.arange(32, dtype=torch.int64)
    words = (bits.view(rows, -1, 32).long() * weights).sum(-1)  # [rows, words]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize(
    "num_rows,mask_vocab,logit_vocab,rows",
    [
        (4, 2048, 2048, None),
        (5, 2000, 2000, None),  # vocab not a multiple of 32
        (6, 2048, 2112, [0, 3, 5]),  # logits padded past the tokenizer's vocabulary
        (8, 333, 400, [7, 1]),
        (3, 64, 64, []),
    ],
)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0])
def test_fast_path_equals_reference(num_rows, mask_vocab, logit_vocab, rows, density):
    gen = torch.Generator().manual_seed(num_rows * 1000 + mask_vocab)
    bitmask = _random_mask(num_rows + 2, mask_vocab, gen, density)  # more rows than logits, as preallocated
    logits = torch.randn(num_rows, logit_vocab, generator=gen)
    fast, ref = logits.clone(), logits.clone()
    apply_bitmask(fast, bitmask, rows)
    apply_bitmask_ref(ref, bitmask, rows)
    assert torch.equal(fast, ref)
    untouched = [r for r in range(num_rows) if rows is not None and r not in rows]
    assert torch.equal(fast[untouched], logits[untouched])
    masked = list(range(num_rows)) if rows is None else rows
    if masked:
        assert torch.isinf(fast[masked][:, 32 * bitmask.shape[1] :]).all()  # past the mask: never allowed


def test_masked_logits_keep_allowed_tokens_exactly():
    logits = torch.randn(2, 100)
    bitmask = allocate_bitmask(2, 100)
    bitmask.zero_()
    bitmask[0, 0] = 1 << 5  # token 5
    bitmask[0, 3] = -(
        1 << 31
    )  # bit 31 alone: token 127: past the logits (vocab 100 < 4 * 32), so nothing else
    bitmask[1, 2] = (1 << 1) | (1 << 2)  # tokens 65, 66
    out = logits.clone()
    apply_bitmask(out, bitmask)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [5]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [65, 66]
    assert out[0, 5] == logits[0, 5] and torch.equal(out[1, 65:67], logits[1, 65:67])


def test_all_allowed_mask_changes_nothing():
    logits = torch.randn(3, 2048)
    out = logits.clone()
    apply_bitmask(out, allocate_bitmask(3, 2048))
    assert torch.equal(out, logits)


def test_bfloat16_logits_and_tensor_rows():
    gen = torch.Generator().manual_seed(0)
    bitmask = _random_mask(4, 2048, gen, 0.3)
    logits = torch.randn(4, 2048, generator=gen).bfloat16()
    fast, ref = logits.clone(), logits.clone()
    apply_bitmask(fast, bitmask, torch.tensor([1, 2]))  # rows may come as a tensor too
    apply_bitmask_ref(ref, bitmask, [1, 2])
    assert torch.equal(fast, ref)


def test_step_bitmask_places_each_requests_rows_like_the_twin():
    """The engine's per-step masks (rows per request id, verify rows in order) land on the logits rows the
    runner names, whatever the order; the plain twin applied to the same pairing agrees."""
    from loom.engine.structured.engine import StepBitmask

    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (7, 3), dtype=torch.int32, generator=gen)
    step = StepBitmask(bitmask, {"a": 0, "b": 1, "c": 4})  # c verifies 2 drafts: rows 4, 5, 6
    logits = torch.randn(9, 80, generator=gen)  # 3 words = 96 bits cover the 80 logits
    for placements in (
        [("a", 0, 1), ("b", 1, 1), ("c", 2, 3)],
        [("x", 0, 1), ("c", 1, 3), ("a", 8, 1)],  # "x" has no grammar; rows out of order
    ):
        fast, ref = logits.clone(), logits.clone()
        step.apply(fast, placements)
        aligned, rows = torch.full((9, 3), -1, dtype=torch.int32), []
        for req_id, first, count in placements:
            if req_id in step.rows:
                start = step.rows[req_id]
                aligned[first : first + count] = bitmask[start : start + count]
                rows += range(first, first + count)
        apply_bitmask_ref(ref, aligned, rows)
        assert torch.equal(fast, ref)
        untouched = [r for r in range(9) if r not in rows]
        assert torch.equal(fast[untouched], logits[untouched])
