"""Sampler: exact masks of top-k / top-p / min-p, greedy rows, per-request seeds, penalties, banned
tokens and log-probabilities, on crafted CPU logits."""

from __future__ import annotations

import math

import pytest
import torch

from loom.layers.sampler import Sampler, SamplingMetadata
from loom.sampling_params import SamplingParams

PROBS = [0.5, 0.3, 0.15, 0.05]


def logits_of(probs, order=None) -> torch.Tensor:
    """A [1, vocab] row whose softmax is `probs` (optionally permuted, to check the sort is undone)."""
    row = torch.tensor(probs, dtype=torch.float64).log().float()
    if order is not None:
        row = row[order]
    return row.unsqueeze(0)


def meta(params: list[SamplingParams], **fields) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata(
        params=params,
        output_token_ids=fields.get("output_token_ids", [[] for _ in range(n)]),
        prompt_token_ids=fields.get("prompt_token_ids", [[] for _ in range(n)]),
        generators=fields.get("generators", [None] * n),
        banned_token_ids=fields.get("banned_token_ids", [[] for _ in range(n)]),
    )


def kept(logits: torch.Tensor, **params) -> list[int]:
    """Token ids of row 0 that survive the filters."""
    out = Sampler._filter(logits.clone(), [SamplingParams(**params)])
    return torch.isfinite(out[0]).nonzero().flatten().tolist()


# ---- masks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        # kept iff the probability of the tokens before it is < top_p; cumulative before = 0, .5, .8, .95
        (0.3, [0]),
        (0.49, [0]),
        (0.51, [0, 1]),
        (0.7, [0, 1]),
        (0.79, [0, 1]),
        (0.81, [0, 1, 2]),
        (0.94, [0, 1, 2]),
        (0.96, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_tokens_until_the_mass_before_them_reaches_top_p(top_p, expected):
    assert kept(logits_of(PROBS), top_p=top_p) == expected


def test_top_p_mask_is_mapped_back_to_vocabulary_order():
    order = [2, 0, 3, 1]  # vocab ids 0..3 hold probs 0.15, 0.5, 0.05, 0.3
    assert kept(logits_of(PROBS, order), top_p=0.7) == [1, 3]  # the ids holding 0.5 and 0.3
    assert kept(logits_of(PROBS, order), top_p=0.81) == [0, 1, 3]


@pytest.mark.parametrize(("top_k", "expected"), [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [0, 1, 2, 3])])
def test_top_k_keeps_the_k_most_likely(top_k, expected):
    assert kept(logits_of(PROBS), top_k=top_k) == expected
    order = [3, 2, 1, 0]  # reversed: id 3 is the most likely
    assert kept(logits_of(PROBS, order), top_k=top_k) == sorted(3 - i for i in expected)


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [(0.05, [0, 1, 2, 3]), (0.11, [0, 1, 2]), (0.29, [0, 1, 2]), (0.31, [0, 1]), (0.61, [0]), (1.0, [0])],
)
def test_min_p_drops_tokens_below_a_fraction_of_the_top_one(min_p, expected):
    # floor = 0.5 * min_p; 0.05 survives min_p 0.05 (floor 0.025) but not 0.11 (floor 0.055)
    assert kept(logits_of(PROBS), min_p=min_p) == expected


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # After top_k=3 the probabilities are [.5, .3, .15] / .95: the mass before token 2 is .842, not .8.
    assert kept(logits_of(PROBS), top_k=3, top_p=0.83) == [0, 1]
    assert kept(logits_of(PROBS), top_p=0.83) == [0, 1, 2]


def test_no_filter_leaves_logits_untouched():
    logits = logits_of(PROBS)
    assert Sampler._filter(logits, [SamplingParams()]) is logits


def test_filters_are_per_row():
    logits = logits_of(PROBS).repeat(3, 1)
    params = [SamplingParams(top_k=1), SamplingParams(), SamplingParams(top_p=0.7, min_p=0.31)]
    out = Sampler._filter(logits, params)
    assert torch.isfinite(out).tolist() == [
        [True, False, False, False],
        [True, True, True, True],
        [True, True, False, False],
    ]


def test_sampling_never_leaves_the_kept_set():
    sampler = Sampler(seed=0)
    logits = logits_of(PROBS).repeat(2000, 1)
    params = [SamplingParams(top_p=0.7)] * 2000
    tokens = sampler(logits, meta(params)).token_ids
    assert set(tokens) == {0, 1}


# ---- greedy, seeds, distribution ------------------------------------------------------------------


def test_temperature_zero_rows_are_argmax_in_a_mixed_batch():
    sampler = Sampler(seed=0)
    flat = torch.tensor([[1.0, 1.1, 0.9, 1.05, 1.0]])
    logits = flat.repeat(4, 1)
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=2.0, top_p=0.9),
        SamplingParams(temperature=0.0, top_k=3),
    ]
    sampled_rows = set()
    for _ in range(50):
        tokens = sampler(logits, meta(params)).token_ids
        assert tokens[1] == 1 and tokens[3] == 1
        sampled_rows.add(tokens[0])
    assert len(sampled_rows) > 1  # the sampled rows really do sample


def test_all_greedy_batch_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, -1.0, 4.9]])
    out = Sampler()(logits, meta([SamplingParams(temperature=0.0)] * 2))
    assert out.token_ids == [1, 0]
    assert out.logprobs is None


def _draws(row: torch.Tensor, batch: int, index: int, seed: int, steps: int) -> list[int]:
    """Draw `steps` tokens for a seeded request sitting at `index` in a batch of other requests."""
    sampler = Sampler(seed=1234)
    gen = torch.Generator().manual_seed(seed)
    others = torch.randn(batch, row.shape[-1], generator=torch.Generator().manual_seed(99))
    logits = others.clone()
    logits[index] = row
    params = [SamplingParams(temperature=0.8 + 0.1 * i) for i in range(batch)]
    generators = [None] * batch
    if batch > 1:  # another seeded request in the batch, with its own stream
        other = (index + 1) % batch
        generators[other] = torch.Generator().manual_seed(seed + 1)
    params[index] = SamplingParams(temperature=0.9, top_k=40)
    generators[index] = gen
    out = []
    for _ in range(steps):
        out.append(sampler(logits, meta(params, generators=generators)).token_ids[index])
    return out


def test_seeded_request_is_reproducible_whatever_the_batch():
    row = torch.randn(64, generator=torch.Generator().manual_seed(0))
    alone = _draws(row, batch=1, index=0, seed=7, steps=40)
    in_batch = _draws(row, batch=5, index=2, seed=7, steps=40)
    at_end = _draws(row, batch=5, index=4, seed=7, steps=40)
    assert alone == in_batch == at_end
    assert len(set(alone)) >= 5  # a real random sequence, not a constant
    assert _draws(row, batch=1, index=0, seed=8, steps=40) != alone


def test_unseeded_sampling_follows_the_distribution():
    n = 20000
    logits = logits_of(PROBS).repeat(n, 1)
    tokens = Sampler(seed=3)(logits, meta([SamplingParams()] * n)).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=4).tolist()
    chi2 = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, PROBS, strict=True))
    assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001
    for c, p in zip(counts, PROBS, strict=True):
        assert abs(c / n - p) < 0.015


def test_temperature_sharpens_the_distribution():
    n = 20000
    logits = logits_of(PROBS).repeat(n, 1)
    tokens = Sampler(seed=3)(logits, meta([SamplingParams(temperature=0.5)] * n)).token_ids
    # p^2 normalised: [.25, .09, .0225, .0025] / .365
    expected = [p * p / sum(q * q for q in PROBS) for p in PROBS]
    counts = torch.bincount(torch.tensor(tokens), minlength=4).tolist()
    for c, p in zip(counts, expected, strict=True):
        assert abs(c / n - p) < 0.015


# ---- penalties and banned tokens ------------------------------------------------------------------

RAW = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]


def penalised(prompt, output, **params) -> list[float]:
    logits = torch.tensor([RAW])
    m = meta([SamplingParams(**params)], prompt_token_ids=[prompt], output_token_ids=[output])
    out = Sampler()._apply_penalties(logits, m)
    assert logits.tolist() == [RAW]  # the raw logits are left alone (log-probs come from them)
    return out[0].tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    out = penalised([0, 1], [1, 3, 3], repetition_penalty=2.0)
    # seen = prompt + output = {0, 1, 3}, each penalised once however often it occurs
    assert out == pytest.approx([1.0, -2.0, 0.5, 1.5, -2.0, 1.0])


def test_repetition_penalty_below_one_rewards_seen_tokens():
    out = penalised([4], [], repetition_penalty=0.5)
    assert out == pytest.approx([2.0, -1.0, 0.5, 3.0, -1.0, 1.0])


def test_frequency_penalty_counts_output_occurrences_only():
    out = penalised([0, 2], [1, 3, 3, 3], frequency_penalty=0.5)
    assert out == pytest.approx([2.0, -1.5, 0.5, 1.5, -2.0, 1.0])


def test_presence_penalty_applies_once_to_output_tokens_only():
    out = penalised([0, 2], [1, 3, 3, 3], presence_penalty=0.25)
    assert out == pytest.approx([2.0, -1.25, 0.5, 2.75, -2.0, 1.0])


def test_penalties_combine_repetition_first():
    out = penalised([5], [3, 3], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=1.0)
    # token 3: 3 / 2 - 0.5 * 2 - 1 = -0.5; token 5: 1 / 2
    assert out == pytest.approx([2.0, -1.0, 0.5, -0.5, -2.0, 0.5])


def test_penalties_are_per_row():
    logits = torch.tensor([RAW, RAW])
    params = [SamplingParams(presence_penalty=1.0), SamplingParams()]
    m = meta(params, output_token_ids=[[0], [0]])
    out = Sampler()._apply_penalties(logits, m)
    assert out[0, 0].item() == pytest.approx(1.0)
    assert out[1].tolist() == RAW


def test_penalty_changes_the_greedy_choice():
    logits = torch.tensor([RAW])
    m = meta([SamplingParams(temperature=0.0, repetition_penalty=3.0)], output_token_ids=[[3]])
    assert Sampler()(logits, m).token_ids == [0]


def test_banned_tokens_are_never_sampled():
    n = 500
    logits = torch.tensor([[5.0, 4.9, 0.0, 4.8]]).repeat(n, 1)
    greedy = meta([SamplingParams(temperature=0.0)], banned_token_ids=[[0]])
    assert Sampler()(logits[:1], greedy).token_ids == [1]
    params = [SamplingParams(temperature=1.5)] * n
    tokens = Sampler(seed=0)(logits, meta(params, banned_token_ids=[[0, 1]] * n)).token_ids
    assert 0 not in tokens and 1 not in tokens
    assert set(tokens) == {2, 3}
    assert torch.isfinite(logits).all()  # the caller's logits are not modified


# ---- logprobs --------------------------------------------------------------------------------------


def test_logprobs_sampled_token_first_then_top_values_of_the_raw_distribution():
    logits = torch.tensor([RAW, RAW, RAW])
    params = [
        SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=3.0),
        SamplingParams(logprobs=0, temperature=0.3),
        SamplingParams(),
    ]
    m = meta(params, output_token_ids=[[3], [], []], banned_token_ids=[[], [3], []])
    out = Sampler(seed=0)(logits, m)
    ref = torch.tensor(RAW).log_softmax(-1).tolist()

    # Row 0: greedy under the penalty picks 0; its logprob is still that of the raw (unpenalised) logits.
    assert out.token_ids[0] == 0
    entry = out.logprobs[0]
    assert list(entry) == [0, 3]  # sampled first; then top-2 = [3, 0], 0 already present
    assert entry[0] == pytest.approx(ref[0], abs=1e-6)
    assert entry[3] == pytest.approx(ref[3], abs=1e-6)

    # Row 1: logprobs=0 gives the sampled token only.
    assert list(out.logprobs[1]) == [out.token_ids[1]]
    assert out.logprobs[1][out.token_ids[1]] == pytest.approx(ref[out.token_ids[1]], abs=1e-6)
    assert out.token_ids[1] != 3

    assert out.logprobs[2] is None
    assert math.isclose(sum(math.exp(v) for v in ref), 1.0, rel_tol=1e-6)


def test_logprobs_when_sampled_token_is_not_in_top():
    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0]])
    m = meta([SamplingParams(temperature=0.0, logprobs=2)], banned_token_ids=[[1, 2]])
    out = Sampler()(logits, m)
    ref = logits[0].log_softmax(-1).tolist()
    assert out.token_ids == [0]
    assert list(out.logprobs[0]) == [0, 1, 2]
    assert [out.logprobs[0][t] for t in (0, 1, 2)] == pytest.approx([ref[0], ref[1], ref[2]], abs=1e-6)
