"""Goodput controller: acceptance EMAs and the choice of k (the latency models: test_latency.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.router.goodput import AcceptanceTracker, SpecRequest, batch_goodput, choose_k, expected_kept_tokens


def affine_step_time(const=0.02, per_request=0.0, per_token=2e-4, per_context=1e-8, per_draft=5e-5):
    """Memory-bound (the constant dominates) at small batch, compute-bound at large batch."""

    def step_time(num_requests: int, num_batched_tokens: int, num_context_tokens: int, num_draft_tokens: int):
        return (const + per_request * num_requests + per_token * num_batched_tokens
                + per_context * num_context_tokens + per_draft * num_draft_tokens)

    return step_time


def floor_k(r: SpecRequest) -> int:
    return r.pinned_k if r.pinned_k is not None else int(r.is_probing and r.k_max > 0)


def brute_force(requests, step_time, min_alpha=0.0) -> float:
    ranges = [[r.pinned_k] if r.pinned_k is not None else [floor_k(r)] if r.alpha < min_alpha
              else range(floor_k(r), r.k_max + 1) for r in requests]
    return max(batch_goodput(requests, {r.request_id: k for r, k in zip(requests, ks)}, step_time)
               for ks in itertools.product(*ranges))


# ------------------------------------------------------------------------------ acceptance


def test_expected_kept_tokens():
    assert expected_kept_tokens(1.0, 4) == 5 and expected_kept_tokens(0.0, 4) == 1
    assert expected_kept_tokens(0.6, 3) == pytest.approx((1 - 0.6**4) / 0.4)
    assert expected_kept_tokens(0.7, 0) == 1
    with pytest.raises(ValueError):
        expected_kept_tokens(1.2, 1)


def test_acceptance_ema_converges_and_follows_drift():
    tracker = AcceptanceTracker()
    for _ in range(30):
        tracker.update("r", "ngram", 5, 4)
    assert tracker.estimate("r", "ngram") == pytest.approx(0.8, abs=1e-3)
    for _ in range(15):
        tracker.update("r", "ngram", 5, 1)
    assert tracker.estimate("r", "ngram") == pytest.approx(0.2, abs=0.01)
    rng = np.random.default_rng(0)
    estimates = []
    for _ in range(300):
        tracker.update("noisy", "ngram", 4, int(rng.binomial(4, 0.7)))
        estimates.append(tracker.estimate("noisy", "ngram"))
    assert np.mean(estimates[100:]) == pytest.approx(0.7, abs=0.03)


def test_acceptance_prior_pulls_new_requests():
    tracker = AcceptanceTracker(prior=0.5)
    for i in range(50):
        for _ in range(10):
            tracker.update(f"r{i}", "ngram", 10, 9)
    mean = tracker.proposer_mean("ngram")
    assert mean == pytest.approx(0.9, abs=0.02)
    assert tracker.estimate("new", "ngram") == mean and tracker.estimate("new", "draft") == 0.5
    tracker.update("new", "ngram", 2, 0)  # two rejections against four pseudo-drafts at the mean
    assert tracker.estimate("new", "ngram") == pytest.approx(mean * 4 / 6, abs=1e-9)
    assert tracker.estimate("new", "draft") == 0.5, "each proposer has its own estimate"
    tracker.forget("new")
    assert tracker.estimate("new", "ngram") == tracker.proposer_mean("ngram")
    with pytest.raises(ValueError, match="accepted <= drafted"):
        tracker.update("r0", "ngram", 2, 3)


# ------------------------------------------------------------------------------ choice of k


def mean_k(ks: dict[str, int]) -> float:
    return sum(ks.values()) / len(ks)


def test_k_falls_to_zero_as_the_batch_grows():
    step_time = affine_step_time()
    means = [mean_k(choose_k([SpecRequest(str(i), 0.8, 512, 5) for i in range(b)], step_time))
             for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
    assert means[0] >= 3 and means[-1] == 0
    assert all(a >= b for a, b in itertools.pairwise(means)), means


def test_k_rises_with_acceptance():
    step_time = affine_step_time()
    totals = [sum(choose_k([SpecRequest(str(i), alpha, 512, 8) for i in range(16)], step_time).values())
              for alpha in np.linspace(0.3, 0.99, 15)]
    assert totals[-1] > 0 and all(a <= b for a, b in itertools.pairwise(totals)), totals


def test_low_acceptance_pins_and_disabling():
    step_time = affine_step_time()
    requests = [SpecRequest("low", 0.2, 100, 5), SpecRequest("off", 0.99, 100, 5, pinned_k=0),
                SpecRequest("pinned", 0.5, 100, 5, pinned_k=4), SpecRequest("free", 0.9, 100, 5)]
    ks = choose_k(requests, step_time)
    assert ks["low"] == 0 and ks["off"] == 0 and ks["pinned"] == 4 and ks["free"] > 0
    # At a compute-bound batch speculation stops, but a pin still holds.
    big = [SpecRequest(str(i), 0.8, 512, 5) for i in range(511)] + [SpecRequest("p", 0.8, 512, 5, pinned_k=3)]
    assert choose_k(big, step_time) == {**{str(i): 0 for i in range(511)}, "p": 3}
    assert choose_k([], step_time) == {}


def test_margin_rejects_a_small_predicted_gain():
    step_time = affine_step_time()
    for b in range(1, 512):
        requests = [SpecRequest(str(i), 0.8, 512, 5) for i in range(b)]
        zero = dict.fromkeys((r.request_id for r in requests), 0)
        ks = choose_k(requests, step_time, margin=0.0)
        gain = batch_goodput(requests, ks, step_time) / batch_goodput(requests, zero, step_time) - 1
        if 0 < gain < 0.05:
            assert choose_k(requests, step_time, margin=0.05) == zero
            return
    pytest.fail("no batch size with a gain under the margin")


def test_a_probing_request_drafts_one_token_until_measured():
    step_time = affine_step_time()
    assert choose_k([SpecRequest("new", 0.05, 100, 5, is_probing=True)], step_time) == {"new": 1}
    assert choose_k([SpecRequest("new", 0.05, 100, 5)], step_time) == {"new": 0}
    assert choose_k([SpecRequest("new", 0.05, 100, 0, is_probing=True)], step_time) == {"new": 0}
    assert choose_k([SpecRequest("new", 0.05, 100, 5, pinned_k=0, is_probing=True)], step_time) == {"new": 0}
    assert choose_k([SpecRequest("new", 0.9, 100, 5, is_probing=True)], step_time)["new"] >= 3


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="pinned_k"):
        SpecRequest("r", 0.5, 10, 3, pinned_k=4)
    with pytest.raises(ValueError, match="alpha"):
        SpecRequest("r", 1.5, 10, 3)
    with pytest.raises(ValueError, match="unique"):
        choose_k([SpecRequest("r", 0.5, 10, 3)] * 2, affine_step_time())
    with pytest.raises(ValueError, match="positive"):
        batch_goodput([SpecRequest("r", 0.5, 10, 3)], {"r": 1}, lambda *_: 0.0)


@st.composite
def batches(draw, max_size=8, max_k=6):
    requests = []
    for i in range(draw(st.integers(1, max_size))):
        k_max = draw(st.integers(0, max_k))
        pinned = draw(st.none() | st.integers(0, k_max)) if draw(st.booleans()) and draw(st.booleans()) else None
        alpha = draw(st.floats(0, 1))
        requests.append(SpecRequest(f"r{i}", alpha, draw(st.integers(0, 4096)), k_max, pinned, draw(st.booleans())))
    return requests


step_times = st.builds(affine_step_time, st.floats(1e-4, 0.1), st.floats(0, 1e-3), st.floats(0, 1e-3),
                       st.floats(0, 1e-6), st.floats(0, 1e-3))


@settings(max_examples=300, deadline=None)
@given(batches(), step_times, st.floats(0, 0.2), st.floats(0, 1))
def test_chosen_k_never_loses_goodput_and_respects_bounds(requests, step_time, margin, min_alpha):
    ks = choose_k(requests, step_time, margin=margin, min_alpha=min_alpha)
    floor = {r.request_id: floor_k(r) for r in requests}
    assert batch_goodput(requests, ks, step_time) >= batch_goodput(requests, floor, step_time)
    for r in requests:
        assert floor_k(r) <= ks[r.request_id] <= r.k_max
        assert r.pinned_k is None or ks[r.request_id] == r.pinned_k
        assert r.pinned_k is not None or r.alpha >= min_alpha or ks[r.request_id] == floor_k(r)
    free = [r for r in requests if r.pinned_k is None and not r.is_probing]
    for a, b in itertools.permutations(free, 2):
        if b.alpha > a.alpha + 1e-9:  # b's every next draft adds more than a's: it is served first
            assert ks[a.request_id] <= ks[b.request_id] or ks[b.request_id] == b.k_max, (a, b, ks)


@settings(max_examples=300, deadline=None)
@given(batches(max_size=3, max_k=4), step_times)
def test_greedy_matches_brute_force_on_small_batches(requests, step_time):
    # Exact, not within a tolerance: see choose_k's docstring (affine step time -> unimodal goodput).
    ks = choose_k(requests, step_time, margin=0.0, min_alpha=0.0)
    assert batch_goodput(requests, ks, step_time) == pytest.approx(brute_force(requests, step_time), rel=1e-12)
