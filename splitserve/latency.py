"""Latency models: what a worker's steps cost, fitted online from the steps themselves.

Workers fit their own models from the ``StepStats`` their engine records (a short profile at
start, then every step) and publish ``to_coefficients()`` in the MetadataStore under the
model's ``NAME``; routers (and the simulator) rebuild read-only copies with
``from_coefficients`` and predict with them. Pure numpy: no Ray, no torch, no I/O.

- ``DecodeStepModel``: a decode step's time T(requests, batched tokens, context tokens,
  drafted tokens) -- what speculation and decode placement predict with.
- ``PrefillModel``: a prefill step's time by its prompt tokens -- what prefill placement and
  admission predict TTFT with.
- ``LinearModel``: the non-negative least squares under both, with fit quality (r2, rmse, n).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import ClassVar, Protocol, Self

import numpy as np

DECODE_FEATURES: tuple[str, ...] = ("const", "requests", "batched_tokens", "context_tokens", "draft_tokens")
PREFILL_FEATURES: tuple[str, ...] = ("const", "tokens", "tokens_sq")
# Rough CPU-sized guesses (seconds per unit) that only matter until the startup profile lands.
DEFAULT_DECODE_PRIOR = {
    "const": 1e-2, "requests": 1e-4, "batched_tokens": 1e-4, "context_tokens": 1e-7, "draft_tokens": 5e-5,
}
DEFAULT_PREFILL_PRIOR = {"const": 5e-3, "tokens": 2e-4, "tokens_sq": 1e-8}
_QUALITY_KEYS = ("r2", "rmse", "n")
_MIN_STEP_TIME = 1e-6  # a degenerate fit must not let the controller divide by zero


@dataclass(frozen=True)
class Fit:
    coefficients: dict[str, float]
    r2: float  # over the window; 0.0 with no samples
    rmse: float  # seconds; 0.0 with no samples (num_samples says how much to trust the fit)
    num_samples: int


class LinearModel:
    """Online least squares ``y ~ w . x`` over named features, refitted from a sliding window.

    It minimizes ``|X w - y|^2 + ridge * sum_j s_j^2 (w_j - p_j)^2`` subject to ``w >= 0``, with
    ``p`` the prior and ``s_j`` feature j's RMS in the window: ridge in standardized units, worth
    ``ridge`` of one sample, so directions the data does not see (a handful of samples, a feature
    that never varied, features that move together) stay at the prior instead of anywhere, while
    directions it sees are barely biased.
    Every feature here is a cost, so all coefficients are non-negative; the constrained problem is
    solved exactly (NNLS) by trying every active set (2^d tiny solves, d <= 8), because clipping
    an unconstrained solution leaves the other coefficients fitted against the wrong residual.
    """

    def __init__(self, features: Sequence[str], window: int = 2048, prior: Mapping[str, float] | None = None,
                 ridge: float = 1e-3):
        if not 0 < len(features) <= 8 or len(set(features)) != len(features) or set(features) & set(_QUALITY_KEYS):
            raise ValueError(f"features must be 1..8 distinct names other than {_QUALITY_KEYS}, got {features}")
        if window < 1 or ridge <= 0:
            raise ValueError(f"window must be >= 1 and ridge > 0, got window={window} ridge={ridge}")
        self.features = tuple(features)
        self.prior = self._vector(prior) if prior is not None else np.zeros(len(features))
        if (self.prior < 0).any():
            raise ValueError(f"prior coefficients must be >= 0, got {dict(prior or {})}")
        self.ridge = ridge
        self._samples: deque[tuple[np.ndarray, float]] = deque(maxlen=window)
        self._fit: Fit | None = None
        self._is_read_only = False

    def _vector(self, x: Mapping[str, float]) -> np.ndarray:
        if set(x) != set(self.features):
            raise ValueError(f"expected features {self.features}, got {sorted(x)}")
        return np.array([float(x[f]) for f in self.features])

    def add(self, x: Mapping[str, float], y: float) -> None:
        if self._is_read_only:
            raise RuntimeError("a model rebuilt from coefficients is read-only")
        vector = self._vector(x)
        if not (math.isfinite(y) and np.isfinite(vector).all()):
            raise ValueError(f"sample must be finite, got x={dict(x)} y={y}")
        self._samples.append((vector, float(y)))
        self._fit = None

    def fit(self) -> Fit:
        if self._fit is None:
            self._fit = self._solve()
        return self._fit

    def _solve(self) -> Fit:
        n = len(self._samples)
        X = np.array([s[0] for s in self._samples]).reshape(n, len(self.features))
        y = np.array([s[1] for s in self._samples])
        rms = np.sqrt((X**2).mean(axis=0)) if n else np.zeros(len(self.features))
        scale = np.where(rms > 0, rms, 1.0)
        Z = X / scale  # in standardized units the ridge term is ridge * |v - prior * scale|^2
        A = Z.T @ Z + self.ridge * np.eye(len(self.features))
        b = Z.T @ y + self.ridge * self.prior * scale
        best, best_value = np.zeros(len(self.features)), 0.0
        for size in range(1, len(self.features) + 1):
            for active in map(list, combinations(range(len(self.features)), size)):
                v = np.linalg.solve(A[np.ix_(active, active)], b[active])
                value = -float(b[active] @ v)  # v'Av - 2b'v at the restricted optimum
                if (v >= 0).all() and value < best_value:
                    best, best_value = np.zeros(len(self.features)), value
                    best[active] = v
        w = best / scale
        residual = y - X @ w
        ss_res, ss_tot = float(residual @ residual), float(((y - y.mean()) ** 2).sum()) if n else 0.0
        r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float(n > 0 and ss_res <= 1e-18)
        rmse = math.sqrt(ss_res / n) if n else 0.0
        return Fit(dict(zip(self.features, map(float, w))), r2, rmse, n)

    def predict(self, x: Mapping[str, float]) -> float:
        coefficients = self.fit().coefficients
        return float(sum(coefficients[f] * v for f, v in zip(self.features, self._vector(x))))

    def to_coefficients(self) -> dict[str, float]:
        fit = self.fit()
        return {**fit.coefficients, "r2": fit.r2, "rmse": fit.rmse, "n": float(fit.num_samples)}

    @classmethod
    def from_coefficients(cls, features: Sequence[str], coefficients: Mapping[str, float]) -> LinearModel:
        missing = [f for f in features if f not in coefficients]
        if missing:
            raise ValueError(f"coefficients lack features {missing}")
        model = cls(features, prior={f: coefficients[f] for f in features})
        model._fit = Fit({f: float(coefficients[f]) for f in features}, float(coefficients.get("r2", 0.0)),
                         float(coefficients.get("rmse", 0.0)), int(coefficients.get("n", 0)))
        model._is_read_only = True
        return model


def decode_step_features(num_requests: int, num_batched_tokens: int, num_context_tokens: int,
                         num_draft_tokens: int = 0) -> dict[str, float]:
    return {"const": 1.0, "requests": float(num_requests), "batched_tokens": float(num_batched_tokens),
            "context_tokens": float(num_context_tokens), "draft_tokens": float(num_draft_tokens)}


def prefill_features(num_prompt_tokens: int) -> dict[str, float]:
    """Linear layers cost per token; attention over the prompt costs per token pair."""
    return {"const": 1.0, "tokens": float(num_prompt_tokens), "tokens_sq": float(num_prompt_tokens) ** 2}


class StepStatsLike(Protocol):
    step_time: float
    num_requests: int
    num_batched_tokens: int
    num_context_tokens: int
    num_draft_tokens: int


class _WorkerModel:
    NAME: ClassVar[str]  # the key its coefficients are published under in the MetadataStore
    features: tuple[str, ...]
    default_prior: Mapping[str, float]

    def __init__(self, prior: Mapping[str, float] | None = None, window: int = 2048):
        self.model = LinearModel(self.features, window, prior if prior is not None else self.default_prior)

    def fit(self) -> Fit:
        return self.model.fit()

    def to_coefficients(self) -> dict[str, float]:
        return self.model.to_coefficients()

    @classmethod
    def from_coefficients(cls, coefficients: Mapping[str, float]) -> Self:
        worker_model = cls()
        worker_model.model = LinearModel.from_coefficients(cls.features, coefficients)
        return worker_model


class DecodeStepModel(_WorkerModel):
    """One decode worker's step time T(requests, batched tokens, context tokens, drafts), its
    proposer's drafting included (the ``draft_tokens`` coefficient: drafting cost per drafted
    token). In pure decode, batched = requests + drafts, so those three move together; the ridge
    prior settles their split, and predictions on that manifold (all ``choose_k`` asks) are what
    the data pins down. The startup profile should vary batch size, k and context length."""

    NAME = "decode_step"
    features, default_prior = DECODE_FEATURES, DEFAULT_DECODE_PRIOR

    def add_step(self, stats: StepStatsLike) -> None:
        x = decode_step_features(stats.num_requests, stats.num_batched_tokens, stats.num_context_tokens,
                                 stats.num_draft_tokens)
        self.model.add(x, stats.step_time)

    def predict(self, num_requests: int, num_batched_tokens: int, num_context_tokens: int,
                num_draft_tokens: int = 0) -> float:
        x = decode_step_features(num_requests, num_batched_tokens, num_context_tokens, num_draft_tokens)
        return max(self.model.predict(x), _MIN_STEP_TIME)


class PrefillModel(_WorkerModel):
    """One prefill worker's time to prefill a prompt of n tokens: const + a n + b n^2."""

    NAME = "prefill"
    features, default_prior = PREFILL_FEATURES, DEFAULT_PREFILL_PRIOR

    def add(self, num_prompt_tokens: int, seconds: float) -> None:
        self.model.add(prefill_features(num_prompt_tokens), seconds)

    def predict(self, num_prompt_tokens: int) -> float:
        return max(self.model.predict(prefill_features(num_prompt_tokens)), _MIN_STEP_TIME)
