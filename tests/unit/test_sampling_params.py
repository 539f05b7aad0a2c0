"""SamplingParams: bad settings are refused at the edge with a message naming the field."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from splitserve.engine.sampling_params import SamplingParams


def test_defaults_are_valid():
    params = SamplingParams()
    assert params.max_tokens == 16 and params.temperature == 1.0
    assert params.top_k is None and params.top_p == 1.0 and params.seed is None
    assert params.stop == () and params.stop_token_ids == ()
    assert not params.is_greedy
    assert SamplingParams(temperature=0).is_greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 2.5),
        ("max_tokens", None),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", -math.inf),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", -0.5),
        ("top_p", 1.0001),
        ("top_p", math.nan),
        ("top_k", 0),
        ("top_k", -1),
        ("top_k", 2.0),
        ("top_k", True),
        ("seed", 1.5),
        ("seed", "7"),
        ("seed", True),
        ("stop", 5),
        ("stop", [1, 2]),
        ("stop", ["ok", None]),
        ("stop", b"bytes"),
        ("stop", ""),
        ("stop", ["end", ""]),
        ("stop_token_ids", 5),
        ("stop_token_ids", "12"),
        ("stop_token_ids", [1, "2"]),
        ("stop_token_ids", [1.0]),
        ("stop_token_ids", [True]),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("stop", ["x"] * 65),
        ("stop", ["x" * 513]),
        ("stop_token_ids", [1] * 1025),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(field: str, value: object):
    with pytest.raises(ValueError) as error:
        SamplingParams(**{field: value})
    assert re.search(rf"\b{field}\b", str(error.value)), f"message does not name {field}: {error.value}"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 1},
        {"temperature": 0.0},
        {"temperature": 100.0},
        {"top_p": 1.0},
        {"top_p": 1e-9},
        {"top_k": 1},
        {"seed": 0},
        {"seed": -5},
        {"stop": []},
        {"stop_token_ids": []},
        {"seed": 2**64 - 1},
        {"seed": -(2**63)},
        {"stop": ["x" * 512] * 64, "stop_token_ids": [1] * 1024},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict):
    SamplingParams(**kwargs)


def test_lists_become_tuples():
    params = SamplingParams(stop=["###", "\n\n"], stop_token_ids=[2, 7])
    assert params.stop == ("###", "\n\n") and isinstance(params.stop, tuple)
    assert params.stop_token_ids == (2, 7) and isinstance(params.stop_token_ids, tuple)
    assert SamplingParams(stop="END").stop == ("END",)  # one string is one stop string
    assert SamplingParams(stop_token_ids=range(3)).stop_token_ids == (0, 1, 2)
    hash(params)  # frozen and hashable: can key caches


def test_params_are_frozen():
    params = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.0  # type: ignore[misc]
