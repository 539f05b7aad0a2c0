"""Latency models: what a worker's steps cost, fitted online from the steps themselves.

Workers fit their own models from the ``StepStats`` their engine records (a short profile at
start, then every step) and publish ``to_coefficients()`` in the MetadataStore under the
model's ``NAME``; routers (and the simulator) rebuild read-only copies with
``from_coefficients`` and predict with them. Pure numpy: no Ray, no torch, no I/O.

- ``DecodeStepModel``: a decode step's time T(requests, batched tokens, context tokens,
  drafted tokens) -- what speculation and decode placement predict with.
- ``PrefillModel``: a prefill step's time by its prompt tokens -- what prefill placement and
  admission predict TTFT with.
- ``MixedStepModel``: a step's time with or without one prompt chunk inside the decode batch --
  what the router predicts with, for a prompt prefilled where requests decode, its prefill time
  and the delay it adds to those requests (``prefill_seconds``).
- ``LinearModel``: the non-negative least squares under them all, with fit quality (r2, rmse, n).
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
MIXED_FEATURES: tuple[str, ...] = (
    "const", "requests", "decode_tokens", "draft_tokens", "prefill_tokens", "prefill_attention", "context_tokens",
)
DEFAULT_MIXED_PRIOR = {
    "const": 1e-2, "requests": 1e-4, "decode_tokens": 1e-4, "draft_tokens": 5e-5, "prefill_tokens": 2e-4,
    "prefill_attention": 1e-8, "context_tokens": 1e-7,
}
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

    def predict_many(self, x: Mapping[str, float | np.ndarray]) -> np.ndarray:
        """``predict`` over arrays of feature values that broadcast together."""
        if set(x) != set(self.features):
            raise ValueError(f"expected features {self.features}, got {sorted(x)}")
        coefficients = self.fit().coefficients
        return sum((coefficients[f] * np.asarray(x[f], dtype=float) for f in self.features), np.zeros(()))

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


def mixed_step_features(num_requests: float | np.ndarray, num_decode_tokens: float | np.ndarray,
                        num_draft_tokens: float | np.ndarray, num_prefill_tokens: float | np.ndarray,
                        prefill_attention: float | np.ndarray,
                        num_context_tokens: float | np.ndarray) -> dict[str, float | np.ndarray]:
    """Decode rows (drafts among them) cost per row; prompt rows cost per row and per attention
    pair they compute; every row reads its context. Scalars or arrays of steps alike."""
    return {"const": 1.0, "requests": num_requests, "decode_tokens": num_decode_tokens,
            "draft_tokens": num_draft_tokens, "prefill_tokens": num_prefill_tokens,
            "prefill_attention": prefill_attention, "context_tokens": num_context_tokens}


class StepStatsLike(Protocol):
    step_time: float
    num_requests: int
    num_batched_tokens: int
    num_context_tokens: int
    num_draft_tokens: int


class MixedStepStatsLike(StepStatsLike, Protocol):
    num_prefill_tokens: int
    prefill_attention: int


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


@dataclass(frozen=True)
class ChunkedPrefill:
    """What prefilling a prompt in chunks inside a decode batch costs, predicted."""

    seconds: float  # the steps that carry its chunks, end to end
    extra_decode_seconds: float  # what those steps add over as many plain decode steps: every decode's delay
    worst_step_s: float  # the longest of those steps: the worst gap between two of a decode's tokens
    num_steps: int


class MixedStepModel(_WorkerModel):
    """One worker's step time with prompt chunks mixed into its decode batch, fitted on every
    step, pure decode ones included, so one model predicts a step with and without a chunk.
    ``decode_tokens`` counts decode rows with their drafts and ``draft_tokens`` the drafts alone;
    a chunk's cost is ``prefill_tokens`` plus ``prefill_attention`` (tokens * (start + tokens),
    the attention pairs it computes), and its start adds to ``context_tokens``."""

    NAME = "mixed_step"
    features, default_prior = MIXED_FEATURES, DEFAULT_MIXED_PRIOR

    def add_step(self, stats: MixedStepStatsLike) -> None:
        x = mixed_step_features(stats.num_requests, stats.num_batched_tokens - stats.num_prefill_tokens,
                                stats.num_draft_tokens, stats.num_prefill_tokens, stats.prefill_attention,
                                stats.num_context_tokens)
        self.model.add(x, stats.step_time)

    def predict(self, num_decoding: int, num_draft_tokens: int, context_tokens: int, chunk_tokens: int = 0,
                chunk_start: int = 0) -> float:
        """A step of ``num_decoding`` decodes carrying ``num_draft_tokens`` drafts in all over
        ``context_tokens`` of context, plus (chunk_tokens > 0) one prompt chunk of
        ``chunk_tokens`` tokens from position ``chunk_start``."""
        times = self._step_times(num_decoding, num_draft_tokens, context_tokens, np.array([chunk_tokens]),
                                 np.array([chunk_start]))
        return float(times[0])

    def prefill_seconds(self, num_tokens: int, chunk_tokens: int, num_decoding: int, num_draft_tokens: int,
                        context_tokens: int, start: int = 0) -> ChunkedPrefill:
        """Prefilling prompt tokens [start, start + num_tokens) in chunks of at most
        ``chunk_tokens``, one a step, beside a decode batch held as it is now (see ``predict``)."""
        if num_tokens < 1 or chunk_tokens < 1:
            raise ValueError(f"num_tokens and chunk_tokens must be >= 1, got {num_tokens} and {chunk_tokens}")
        starts = np.arange(start, start + num_tokens, chunk_tokens)
        sizes = np.minimum(chunk_tokens, start + num_tokens - starts)
        times = self._step_times(num_decoding, num_draft_tokens, context_tokens, sizes, starts)
        plain = self.predict(num_decoding, num_draft_tokens, context_tokens)
        return ChunkedPrefill(float(times.sum()), float((times - plain).sum()), float(times.max()), len(times))

    def _step_times(self, num_decoding: int, num_draft_tokens: int, context_tokens: int, sizes: np.ndarray,
                    starts: np.ndarray) -> np.ndarray:
        """Steps that each add a chunk of sizes[i] tokens from starts[i] (size 0: no chunk)."""
        has_chunk = sizes > 0
        x = mixed_step_features(num_decoding + has_chunk, num_decoding + num_draft_tokens, num_draft_tokens, sizes,
                                sizes * (starts + sizes), context_tokens + starts * has_chunk)
        return np.maximum(self.model.predict_many(x), _MIN_STEP_TIME)
