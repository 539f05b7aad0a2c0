"""Goodput controller: fitted latency models, acceptance estimates and the per-request choice of k.

Pure functions and small classes, no Ray and no I/O. Workers fit their own latency models from
the ``StepStats`` their engine records (a short profile at startup, then every step) and put
``to_coefficients()`` in the MetadataStore; the router rebuilds read-only copies with
``from_coefficients`` and, on every stats report, re-runs ``choose_k`` for each decode worker's
batch with its ``AcceptanceTracker`` estimates (SmartSpec: goodput = expected kept tokens per
second of predicted step time).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Protocol, Self

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

    features, default_prior = PREFILL_FEATURES, DEFAULT_PREFILL_PRIOR

    def add(self, num_prompt_tokens: int, seconds: float) -> None:
        self.model.add(prefill_features(num_prompt_tokens), seconds)

    def predict(self, num_prompt_tokens: int) -> float:
        return max(self.model.predict(prefill_features(num_prompt_tokens)), _MIN_STEP_TIME)


def expected_kept_tokens(alpha: float, k: int) -> float:
    """Tokens one verification step keeps with k drafts, each accepted with probability alpha
    until the first rejection, plus the target's own token: sum_{j<=k} alpha^j =
    (1 - alpha^(k+1)) / (1 - alpha), which is k + 1 at alpha = 1 (summed: exact near 1)."""
    if not 0.0 <= alpha <= 1.0 or k < 0:
        raise ValueError(f"need 0 <= alpha <= 1 and k >= 0, got alpha={alpha} k={k}")
    return math.fsum(alpha**j for j in range(k + 1))


@dataclass
class _Ema:
    value: float
    num_drafts: int = 0

    def add(self, rate: float, num_drafts: int, weight: float, prior_strength: float) -> None:
        # Early on the step is the Bayesian running mean with `prior_strength` pseudo-drafts at the
        # prior; once evidence piles up it never drops below `weight`, so drift is still followed.
        self.num_drafts += num_drafts
        self.value += max(weight, num_drafts / (self.num_drafts + prior_strength)) * (rate - self.value)


class AcceptanceTracker:
    """Acceptance rate alpha per (request, proposer): an EMA of accepted / proposed over the
    increments each stats report brings, starting from the proposer's mean, itself a slower EMA
    over all of that proposer's requests (starting from ``prior``). ``proposer`` names the prior's
    group: a proposer, or a proposer and workload class (``"ngram/code"``); a router keeps one
    tracker per decode worker, or puts the worker in that name."""

    def __init__(self, prior: float = 0.5, weight: float = 0.3, prior_strength: float = 4.0,
                 global_weight: float = 0.02):
        if not (0 <= prior <= 1 and 0 < weight <= 1 and 0 < global_weight <= 1 and prior_strength >= 0):
            raise ValueError("need 0 <= prior <= 1, 0 < weight, global_weight <= 1 and prior_strength >= 0")
        self.prior, self.weight, self.prior_strength, self.global_weight = prior, weight, prior_strength, global_weight
        self._means: dict[str, _Ema] = {}
        self._requests: dict[str, dict[str, _Ema]] = {}

    def update(self, request_id: str, proposer: str, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        if not 0 <= num_accepted_tokens <= num_draft_tokens:
            raise ValueError(f"need 0 <= accepted <= drafted, got {num_accepted_tokens} of {num_draft_tokens}")
        if num_draft_tokens == 0:
            return
        rate = num_accepted_tokens / num_draft_tokens
        mean = self._means.setdefault(proposer, _Ema(self.prior))
        ema = self._requests.setdefault(request_id, {}).setdefault(proposer, _Ema(mean.value))
        ema.add(rate, num_draft_tokens, self.weight, self.prior_strength)
        mean.add(rate, num_draft_tokens, self.global_weight, self.prior_strength)

    def proposer_mean(self, proposer: str) -> float:
        mean = self._means.get(proposer)
        return mean.value if mean is not None else self.prior

    def estimate(self, request_id: str, proposer: str) -> float:
        ema = self._requests.get(request_id, {}).get(proposer)
        return ema.value if ema is not None else self.proposer_mean(proposer)

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)


@dataclass(frozen=True)
class SpecRequest:
    request_id: str
    alpha: float
    context_tokens: int
    k_max: int
    pinned_k: int | None = None  # the request fixed its own k (0: speculation disabled)

    def __post_init__(self) -> None:
        if not (0 <= self.alpha <= 1 and self.context_tokens >= 0 and self.k_max >= 0):
            raise ValueError(f"need 0 <= alpha <= 1, context_tokens >= 0, k_max >= 0: {self}")
        if self.pinned_k is not None and not 0 <= self.pinned_k <= self.k_max:
            raise ValueError(f"pinned_k must be in 0..k_max: {self}")


StepTime = Callable[[int, int, int, int], float]


def batch_goodput(requests: Sequence[SpecRequest], ks: Mapping[str, int], step_time: StepTime) -> float:
    """Expected kept tokens per second of one verification step of the whole batch:
    sum_i kept(alpha_i, k_i) / step_time(B, B + K, sum of contexts, K) with K = sum_i k_i."""
    for r in requests:
        if not 0 <= ks[r.request_id] <= r.k_max:
            raise ValueError(f"k={ks[r.request_id]} outside 0..{r.k_max} for {r.request_id}")
    num_drafts = sum(ks[r.request_id] for r in requests)
    seconds = step_time(len(requests), len(requests) + num_drafts, sum(r.context_tokens for r in requests), num_drafts)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"step_time must be a positive number of seconds, got {seconds}")
    return math.fsum(expected_kept_tokens(r.alpha, ks[r.request_id]) for r in requests) / seconds


def choose_k(requests: Sequence[SpecRequest], step_time: StepTime, *, margin: float = 0.05,
             min_alpha: float = 0.3) -> dict[str, int]:
    """Each request's k in 0..k_max maximizing ``batch_goodput``; pinned requests keep theirs and
    requests with alpha < min_alpha get 0.

    Greedy marginal allocation: give one more draft to the request whose next draft adds most
    kept tokens (the j-th draft adds alpha^j), as long as batch goodput rises. The step time
    depends on the drafts only through their total K, so every candidate increment costs the
    same and the best is the largest alpha^(k_i+1); and as each request's gains shrink with j,
    taking the largest gains first gives the most kept tokens S(K) for every K (exchange
    argument), with S concave in K. For a step time affine in K (every fitted LinearModel),
    S(K)/T(K) is then unimodal, so the first increment that does not help marks the global
    optimum: the result equals brute force over all k vectors (for a non-affine step time it is
    a local optimum). The winner is kept only if it beats k = 0 (pins kept) by a relative
    ``margin``: a predicted gain smaller than the errors of the fitted step time and of the
    alpha estimates is noise, and speculating still costs draft KV slots and TPOT variance.
    Call it again on every stats report: both the load and the alphas move.
    """
    if len({r.request_id for r in requests}) != len(requests):
        raise ValueError("request ids must be unique")
    base = {r.request_id: r.pinned_k or 0 for r in requests}
    num_requests, context = len(requests), sum(r.context_tokens for r in requests)
    num_drafts = sum(base.values())
    kept = math.fsum(expected_kept_tokens(r.alpha, base[r.request_id]) for r in requests)
    best = kept / step_time(num_requests, num_requests + num_drafts, context, num_drafts)
    # Heap of each free request's next increment: (-gain, j, index); j before index spreads ties.
    heap = [(-r.alpha, 1, i) for i, r in enumerate(requests) if r.pinned_k is None and r.alpha >= min_alpha
            and r.k_max > 0]
    heapq.heapify(heap)
    ks = dict(base)
    while heap:
        gain, j, i = heap[0]
        goodput = (kept - gain) / step_time(num_requests, num_requests + num_drafts + 1, context, num_drafts + 1)
        if goodput <= best:
            break
        heapq.heappop(heap)
        best, kept, num_drafts = goodput, kept - gain, num_drafts + 1
        ks[requests[i].request_id] = j
        if j < requests[i].k_max:
            heapq.heappush(heap, (-requests[i].alpha ** (j + 1), j + 1, i))
    if ks != base and batch_goodput(requests, ks, step_time) > (1 + margin) * batch_goodput(requests, base, step_time):
        return ks
    return base
