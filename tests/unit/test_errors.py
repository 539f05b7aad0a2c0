"""CapacityError's retry hint: optional, kept as given (also across pickling, as between Ray
processes), and finite so the front ends can round it."""

from __future__ import annotations

import math
import pickle

import pytest

from splitserve.errors import CapacityError


def test_a_capacity_error_has_a_retry_hint_only_when_given():
    assert CapacityError("no free KV blocks").retry_after_s is None
    error = CapacityError("no free KV blocks", retry_after_s=1.2)
    assert (str(error), error.retry_after_s) == ("no free KV blocks", 1.2)


def test_the_retry_hint_survives_pickling():
    copy = pickle.loads(pickle.dumps(CapacityError("no free KV blocks", retry_after_s=1.2)))
    assert (type(copy), str(copy), copy.retry_after_s) == (CapacityError, "no free KV blocks", 1.2)


@pytest.mark.parametrize("retry_after_s", [-0.5, math.inf, math.nan])
def test_a_retry_hint_is_finite_and_not_negative(retry_after_s: float):
    with pytest.raises(ValueError, match="retry_after_s must be None or finite seconds >= 0"):
        CapacityError("no free KV blocks", retry_after_s)
