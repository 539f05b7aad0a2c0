"""Latency models: least squares with a prior, their fit quality, and the worker models built
on them (splitserve.latency)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from splitserve.engine.engine import StepStats
from splitserve.latency import (
    DECODE_FEATURES,
    MIXED_FEATURES,
    ChunkedPrefill,
    DecodeStepModel,
    LinearModel,
    MixedStepModel,
    PrefillModel,
    decode_step_features,
    mixed_step_features,
)

FEATURES = ("const", "a", "b", "c")
TRUE = {"const": 0.01, "a": 2e-3, "b": 5e-4, "c": 1e-6}


def samples(rng: np.random.Generator, coefficients: dict[str, float], n: int, noise: float = 1e-4):
    for _ in range(n):
        x = {"const": 1.0, "a": rng.uniform(1, 64), "b": rng.uniform(1, 512), "c": rng.uniform(0, 1e5)}
        yield x, sum(coefficients[f] * v for f, v in x.items()) + rng.normal(0, noise)



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


MIXED_TRUE = {"const": 8e-3, "requests": 2e-4, "decode_tokens": 3e-4, "draft_tokens": 1e-4, "prefill_tokens": 5e-4,
              "prefill_attention": 2e-8, "context_tokens": 1e-7}


def mixed_steps(rng: np.random.Generator, n: int):
    """Steps of 0-32 decodes (0-4 drafts each) and 0-2 prompt chunks, timed by MIXED_TRUE."""
    for _ in range(n):
        num_decoding, num_chunks = int(rng.integers(0, 33)), int(rng.integers(0, 3))
        num_decoding = max(num_decoding, 1 - num_chunks)
        drafts = int(rng.integers(0, 4 * num_decoding + 1))
        chunks = [(int(rng.integers(1, 513)), int(rng.integers(0, 2048))) for _ in range(num_chunks)]
        prefill, attention = sum(c for c, _ in chunks), sum(c * (b + c) for c, b in chunks)
        context = int(rng.integers(0, 100_000)) * (num_decoding > 0) + sum(b for _, b in chunks)
        x = mixed_step_features(num_decoding + num_chunks, num_decoding + drafts, drafts, prefill, attention, context)
        seconds = sum(MIXED_TRUE[f] * v for f, v in x.items()) + rng.normal(0, 1e-4)
        yield StepStats(seconds, 0.0, num_decoding + num_chunks, num_decoding + drafts + prefill, context, drafts, 0,
                        num_prefill_tokens=prefill, prefill_attention=attention)


def test_mixed_step_model_recovers_its_coefficients_from_step_stats():
    model = MixedStepModel()
    assert model.predict(4, 0, 1000, 64, 0) > model.predict(4, 0, 1000) > 0, "the default prior predicts"
    for stats in mixed_steps(np.random.default_rng(0), 1000):
        model.add_step(stats)
    fit = model.fit()
    assert set(fit.coefficients) == set(MIXED_FEATURES) and fit.r2 > 0.99
    assert fit.coefficients == pytest.approx(MIXED_TRUE, rel=0.05)


def test_mixed_step_prediction_without_a_chunk_is_the_plain_decode_step():
    model = MixedStepModel()
    for stats in mixed_steps(np.random.default_rng(1), 200):
        model.add_step(stats)
    plain = model.model.predict(mixed_step_features(8, 8 + 12, 12, 0, 0, 5000))
    assert model.predict(8, 12, 5000) == model.predict(8, 12, 5000, 0, 300) == pytest.approx(plain, rel=1e-12)
    chunk = model.model.predict(mixed_step_features(9, 8 + 12, 12, 64, 64 * (300 + 64), 5000 + 300))
    assert model.predict(8, 12, 5000, 64, 300) == pytest.approx(chunk, rel=1e-12)


def test_prefill_seconds_adds_up_the_chunked_steps():
    w = {"const": 0.01, "requests": 1e-3, "decode_tokens": 1e-3, "draft_tokens": 0.0, "prefill_tokens": 1e-4,
         "prefill_attention": 1e-6, "context_tokens": 1e-5}
    model = MixedStepModel.from_coefficients(w)

    def step(n: int, start: int) -> float:  # 2 decodes over 100 context tokens, plus the chunk
        return 0.01 + 1e-3 * 3 + 1e-3 * 2 + 1e-4 * n + 1e-6 * n * (start + n) + 1e-5 * (100 + start)

    plain = 0.01 + 1e-3 * 2 + 1e-3 * 2 + 1e-5 * 100
    expected = [step(4, 2), step(4, 6), step(2, 10)]  # tokens 2..11 in chunks of at most 4
    result = model.prefill_seconds(10, 4, num_decoding=2, num_draft_tokens=0, context_tokens=100, start=2)
    assert result.num_steps == 3
    assert result.seconds == pytest.approx(sum(expected), rel=1e-12)
    assert result.extra_decode_seconds == pytest.approx(sum(expected) - 3 * plain, rel=1e-12)
    assert result.worst_step_s == pytest.approx(max(expected), rel=1e-12)
    one = model.prefill_seconds(3, 8, 2, 0, 100)  # a prompt shorter than a chunk: one step
    assert one == ChunkedPrefill(pytest.approx(step(3, 0)), pytest.approx(step(3, 0) - plain),
                                 pytest.approx(step(3, 0)), 1)
    with pytest.raises(ValueError, match="chunk_tokens"):
        model.prefill_seconds(10, 0, 2, 0, 100)
    with pytest.raises(ValueError, match="num_tokens"):
        model.prefill_seconds(0, 4, 2, 0, 100)


def test_mixed_step_model_round_trips_through_its_coefficients():
    model = MixedStepModel()
    for stats in mixed_steps(np.random.default_rng(2), 100):
        model.add_step(stats)
    stored = model.to_coefficients()
    assert set(stored) == set(MIXED_FEATURES) | {"r2", "rmse", "n"} and MixedStepModel.NAME == "mixed_step"
    copy = MixedStepModel.from_coefficients(stored)
    assert copy.fit() == model.fit()
    for args in [(0, 0, 0, 128, 0), (16, 32, 40_000), (16, 32, 40_000, 64, 512)]:
        assert copy.predict(*args) == pytest.approx(model.predict(*args), rel=1e-12)
    assert copy.prefill_seconds(300, 64, 16, 32, 40_000) == model.prefill_seconds(300, 64, 16, 32, 40_000)
