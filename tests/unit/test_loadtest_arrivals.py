"""Load-test arrival processes: parsing, seeding, mean rate and burstiness (CV of the gaps)."""

from __future__ import annotations

import numpy as np
import pytest

from splitserve.loadtest.arrivals import Arrival, parse_arrival

NUM_SAMPLES = 20_000


@pytest.mark.parametrize(("text", "cv", "cv_tolerance"), [("poisson", 1, 0.03), ("gamma:3", 3, 0.3), ("constant", 0, 1e-9)])
def test_mean_rate_and_gap_cv(text, cv, cv_tolerance):
    arrival = parse_arrival(text)
    offsets = np.array(arrival.offsets(rate=8.0, num_requests=NUM_SAMPLES, seed=3))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert (NUM_SAMPLES - 1) / offsets[-1] == pytest.approx(8.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, abs=cv_tolerance)
    assert arrival.gap_cv == cv


def test_offsets_are_seeded():
    arrival = parse_arrival("gamma:2")
    assert arrival.offsets(2.0, 100, seed=7) == arrival.offsets(2.0, 100, seed=7)
    assert arrival.offsets(2.0, 100, seed=7) != arrival.offsets(2.0, 100, seed=8)


def test_small_counts():
    assert parse_arrival("poisson").offsets(1.0, 0, seed=0) == []
    assert parse_arrival("poisson").offsets(1.0, 1, seed=0) == [0.0]
    assert parse_arrival("constant").offsets(4.0, 3, seed=0) == [0.0, 0.25, 0.5]


def test_concurrency_is_closed_loop():
    arrival = parse_arrival("concurrency:8")
    assert (arrival.concurrency, arrival.is_open_loop, str(arrival)) == (8, False, "concurrency:8")
    assert parse_arrival("poisson").concurrency is None
    with pytest.raises(ValueError, match="closed loop"):
        arrival.offsets(1.0, 10, seed=0)


def test_names_round_trip():
    for text in ("poisson", "constant", "gamma:1.5", "concurrency:4"):
        assert str(parse_arrival(text)) == text
    assert parse_arrival("gamma:3") == Arrival("gamma", cv=3.0)


@pytest.mark.parametrize(
    "text", ["", "uniform", "poisson:2", "gamma", "gamma:", "gamma:0", "gamma:-1", "gamma:x", "gamma:inf",
             "concurrency", "concurrency:0", "concurrency:1.5", "concurrency:-2"],
)
def test_bad_names_raise(text):
    with pytest.raises(ValueError):
        parse_arrival(text)


@pytest.mark.parametrize(("rate", "num"), [(0.0, 10), (-1.0, 10), (1.0, -1)])
def test_bad_rate_or_count_raise(rate, num):
    with pytest.raises(ValueError):
        parse_arrival("poisson").offsets(rate, num, seed=0)
