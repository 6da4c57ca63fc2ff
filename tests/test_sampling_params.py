"""SamplingParams validation: every out-of-range value raises InvalidRequest naming the field."""

from __future__ import annotations

import math

import pytest

from loom.errors import InvalidRequest
from loom.sampling_params import MAX_LOGPROBS, MAX_STOP_STRINGS, SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("n", 1.5),
        ("max_tokens", -1),
        ("max_tokens", 2.0),
        ("min_tokens", -1),
        ("min_tokens", 1.5),
        ("min_tokens", "1"),
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1"),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("top_p", math.nan),
        ("top_k", 0),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.01),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("stop", [""]),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["2"]),
        ("logprobs", MAX_LOGPROBS + 1),
        ("logprobs", -1),
        ("prompt_logprobs", 21),
        ("prompt_logprobs", -1),
        ("seed", 1.5),
        ("seed", True),
        ("seed", 2**64),  # past what torch's manual_seed takes: it used to overflow inside the engine
        ("seed", -(2**63) - 1),
        ("priority", "high"),
        ("priority", None),
    ],
)
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field
    assert field in str(err.value)
    assert isinstance(err.value, ValueError)


def test_min_tokens_above_max_tokens_names_min_tokens():
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert err.value.param == "min_tokens"
    SamplingParams(max_tokens=None, min_tokens=5)


@pytest.mark.parametrize(
    "params",
    [
        dict(max_tokens=0),
        dict(max_tokens=None),
        dict(temperature=0.0),
        dict(temperature=0),
        dict(top_p=1.0),
        dict(top_p=1e-6),
        dict(top_k=-1),
        dict(top_k=1),
        dict(min_p=0.0),
        dict(min_p=1.0),
        dict(presence_penalty=2.0, frequency_penalty=-2.0),
        dict(presence_penalty=-2.0, frequency_penalty=2.0),
        dict(repetition_penalty=1e-3),
        dict(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS)]),
        dict(logprobs=0, prompt_logprobs=MAX_LOGPROBS),
        dict(logprobs=MAX_LOGPROBS),
        dict(seed=-5),
        dict(seed=2**64 - 1),
        dict(seed=-(2**63)),
    ],
)
def test_boundary_values_are_accepted(params):
    SamplingParams(**params)


def test_stop_and_stop_token_ids_are_normalised_to_lists():
    assert SamplingParams(stop="end").stop == ["end"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


def test_greedy_and_deterministic():
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.5).greedy
    assert SamplingParams(temperature=0.0).deterministic
    assert SamplingParams(temperature=1.0, seed=3).deterministic
    assert not SamplingParams(temperature=1.0).deterministic


def test_validate_catches_values_set_after_construction():
    params = SamplingParams()
    params.top_p = 2.0
    with pytest.raises(InvalidRequest) as err:
        params.validate()
    assert err.value.param == "top_p"
