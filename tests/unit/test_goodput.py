"""Goodput controller: least-squares latency models, acceptance EMAs and the choice of k."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.engine import StepStats
from splitserve.router.goodput import (
    DECODE_FEATURES,
    AcceptanceTracker,
    DecodeStepModel,
    LinearModel,
    PrefillModel,
    SpecRequest,
    batch_goodput,
    choose_k,
    decode_step_features,
    expected_kept_tokens,
)

FEATURES = ("const", "a", "b", "c")
TRUE = {"const": 0.01, "a": 2e-3, "b": 5e-4, "c": 1e-6}


def samples(rng: np.random.Generator, coefficients: dict[str, float], n: int, noise: float = 1e-4):
    for _ in range(n):
        x = {"const": 1.0, "a": rng.uniform(1, 64), "b": rng.uniform(1, 512), "c": rng.uniform(0, 1e5)}
        yield x, sum(coefficients[f] * v for f, v in x.items()) + rng.normal(0, noise)


def affine_step_time(const=0.02, per_request=0.0, per_token=2e-4, per_context=1e-8, per_draft=5e-5):
    """Memory-bound (the constant dominates) at small batch, compute-bound at large batch."""

    def step_time(num_requests: int, num_batched_tokens: int, num_context_tokens: int, num_draft_tokens: int):
        return (const + per_request * num_requests + per_token * num_batched_tokens
                + per_context * num_context_tokens + per_draft * num_draft_tokens)

    return step_time


def brute_force(requests, step_time, min_alpha=0.0) -> float:
    ranges = [[r.pinned_k] if r.pinned_k is not None else [0] if r.alpha < min_alpha else range(r.k_max + 1)
              for r in requests]
    return max(batch_goodput(requests, {r.request_id: k for r, k in zip(requests, ks)}, step_time)
               for ks in itertools.product(*ranges))


# ------------------------------------------------------------------------------ latency models


def test_least_squares_recovers_coefficients_from_noisy_data():
    model = LinearModel(FEATURES)
    for x, y in samples(np.random.default_rng(0), TRUE, 1000):
        model.add(x, y)
    fit = model.fit()
    assert fit.coefficients == pytest.approx(TRUE, rel=0.05)
    assert fit.r2 > 0.99 and fit.rmse == pytest.approx(1e-4, rel=0.2) and fit.num_samples == 1000
    assert model.fit() is fit, "the fit is cached until new samples arrive"
    model.add(*next(samples(np.random.default_rng(1), TRUE, 1)))
    assert model.fit() is not fit


def test_window_follows_a_changed_regime():
    model = LinearModel(FEATURES, window=256)
    rng = np.random.default_rng(0)
    changed = {f: 3 * v for f, v in TRUE.items()}
    for x, y in itertools.chain(samples(rng, TRUE, 1000), samples(rng, changed, 256)):
        model.add(x, y)
    assert model.fit().coefficients == pytest.approx(changed, rel=0.05)
    assert model.fit().num_samples == 256


def test_coefficients_round_trip_to_a_read_only_copy():
    model = LinearModel(FEATURES)
    for x, y in samples(np.random.default_rng(0), TRUE, 50):
        model.add(x, y)
    stored = model.to_coefficients()
    assert set(stored) == set(FEATURES) | {"r2", "rmse", "n"} and stored["n"] == 50
    copy = LinearModel.from_coefficients(FEATURES, stored)
    for x, _ in samples(np.random.default_rng(1), TRUE, 20):
        assert copy.predict(x) == pytest.approx(model.predict(x), rel=1e-12)
    assert copy.fit() == model.fit()
    with pytest.raises(RuntimeError, match="read-only"):
        copy.add(x, 1.0)
    with pytest.raises(ValueError, match="lack features"):
        LinearModel.from_coefficients(FEATURES, {"const": 1.0})


def test_prior_predicts_with_no_samples_and_steadies_a_few():
    prior = {"const": 0.02, "a": 1e-3, "b": 1e-3, "c": 0.0}
    model = LinearModel(FEATURES, prior=prior)
    fit = model.fit()
    assert fit.coefficients == prior and fit.num_samples == 0 and (fit.r2, fit.rmse) == (0.0, 0.0)
    assert model.predict({"const": 1, "a": 10, "b": 20, "c": 5}) == pytest.approx(0.05)
    # Two samples cannot identify four coefficients: the rest stay near the prior, all finite.
    for x, y in samples(np.random.default_rng(0), TRUE, 2):
        model.add(x, y)
        assert model.predict(x) == pytest.approx(y, rel=0.25)
    assert all(math.isfinite(v) and v >= 0 for v in model.fit().coefficients.values())


def test_coefficients_stay_non_negative():
    model = LinearModel(("const", "a"))
    rng = np.random.default_rng(0)
    ys = []
    for _ in range(200):  # time that falls as `a` grows: unphysical, so `a` gets 0
        a = rng.uniform(0, 100)
        ys.append(1.0 - 1e-3 * a + rng.normal(0, 1e-3))
        model.add({"const": 1.0, "a": a}, ys[-1])
    coefficients = model.fit().coefficients
    assert coefficients["a"] == 0.0 and coefficients["const"] == pytest.approx(np.mean(ys), rel=1e-3)


def test_bad_input_is_refused():
    model = LinearModel(FEATURES)
    with pytest.raises(ValueError, match="expected features"):
        model.add({"const": 1.0}, 1.0)
    with pytest.raises(ValueError, match="expected features"):
        model.predict({**TRUE, "typo": 1.0})
    with pytest.raises(ValueError, match="finite"):
        model.add(dict.fromkeys(FEATURES, 1.0), math.nan)
    with pytest.raises(ValueError, match=">= 0"):
        LinearModel(FEATURES, prior={**TRUE, "a": -1.0})
    with pytest.raises(ValueError, match="distinct"):
        LinearModel(("const", "n"))


def test_decode_step_model_learns_from_step_stats():
    def truth(b, k, ctx):
        return 0.015 + 3e-4 * b + 2e-4 * b * k + 2e-7 * ctx

    model = DecodeStepModel()
    rng = np.random.default_rng(0)
    for _ in range(300):
        b, k, ctx = int(rng.integers(1, 64)), int(rng.integers(0, 6)), int(rng.integers(0, 200_000))
        stats = StepStats(truth(b, k, ctx) * rng.normal(1, 0.01), 0.0, b, b + b * k, ctx, b * k, 0)
        model.add_step(stats)
    assert set(model.fit().coefficients) == set(DECODE_FEATURES) and model.fit().r2 > 0.99
    for b, k, ctx in [(1, 0, 100), (8, 4, 50_000), (48, 2, 150_000)]:
        assert model.predict(b, b * (k + 1), ctx, b * k) == pytest.approx(truth(b, k, ctx), rel=0.03)
    copy = DecodeStepModel.from_coefficients(model.to_coefficients())
    assert copy.predict(8, 40, 1000, 32) == pytest.approx(model.predict(8, 40, 1000, 32), rel=1e-12)
    assert decode_step_features(2, 6, 100, 4)["draft_tokens"] == 4.0


def test_prefill_model_fits_a_quadratic_in_prompt_tokens():
    model = PrefillModel()
    assert model.predict(100) > 0, "the default prior predicts before any sample"
    for n in range(16, 4096, 16):
        model.add(n, 0.004 + 1e-4 * n + 2e-8 * n * n)
    for n in (1, 500, 4000, 8000):
        assert model.predict(n) == pytest.approx(0.004 + 1e-4 * n + 2e-8 * n * n, rel=0.02)


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
        requests.append(SpecRequest(f"r{i}", alpha, draw(st.integers(0, 4096)), k_max, pinned))
    return requests


step_times = st.builds(affine_step_time, st.floats(1e-4, 0.1), st.floats(0, 1e-3), st.floats(0, 1e-3),
                       st.floats(0, 1e-6), st.floats(0, 1e-3))


@settings(max_examples=300, deadline=None)
@given(batches(), step_times, st.floats(0, 0.2), st.floats(0, 1))
def test_chosen_k_never_loses_goodput_and_respects_bounds(requests, step_time, margin, min_alpha):
    ks = choose_k(requests, step_time, margin=margin, min_alpha=min_alpha)
    zero = {r.request_id: r.pinned_k or 0 for r in requests}
    assert batch_goodput(requests, ks, step_time) >= batch_goodput(requests, zero, step_time)
    for r in requests:
        assert 0 <= ks[r.request_id] <= r.k_max
        assert r.pinned_k is None or ks[r.request_id] == r.pinned_k
        assert r.pinned_k is not None or r.alpha >= min_alpha or ks[r.request_id] == 0
    free = [r for r in requests if r.pinned_k is None]
    for a, b in itertools.permutations(free, 2):
        if b.alpha > a.alpha + 1e-9:  # b's every next draft adds more than a's: it is served first
            assert ks[a.request_id] <= ks[b.request_id] or ks[b.request_id] == b.k_max, (a, b, ks)


@settings(max_examples=300, deadline=None)
@given(batches(max_size=3, max_k=4), step_times)
def test_greedy_matches_brute_force_on_small_batches(requests, step_time):
    # Exact, not within a tolerance: see choose_k's docstring (affine step time -> unimodal goodput).
    ks = choose_k(requests, step_time, margin=0.0, min_alpha=0.0)
    assert batch_goodput(requests, ks, step_time) == pytest.approx(brute_force(requests, step_time), rel=1e-12)
