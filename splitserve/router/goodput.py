"""Goodput controller: acceptance estimates and the per-request choice of k.

Pure functions and small classes, no Ray and no I/O. On every stats report the router re-runs
``choose_k`` for each decode worker's batch, with that worker's fitted step-time model
(splitserve.latency) and each request's ``AcceptanceTracker`` estimate (SmartSpec: goodput =
expected kept tokens per second of predicted step time).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


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

    def num_drafts(self, request_id: str, proposer: str) -> int:
        """The drafts the request's estimate has seen (0: it is the proposer's mean alone)."""
        ema = self._requests.get(request_id, {}).get(proposer)
        return ema.num_drafts if ema is not None else 0

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)


@dataclass(frozen=True)
class SpecRequest:
    request_id: str
    alpha: float
    context_tokens: int
    k_max: int
    pinned_k: int | None = None  # the request fixed its own k (0: speculation disabled)
    is_probing: bool = False  # its own acceptance is not measured yet: it drafts at least one token

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
    """Each request's k in 0..k_max maximizing ``batch_goodput``; pinned requests keep theirs,
    probing requests get at least 1, and requests with alpha < min_alpha get no more than that.

    Probing: a request's alpha starts at its proposer's mean over other requests, which says
    little about this one (a copy task beside chat traffic), and a request at k = 0 never drafts,
    so an estimate below the break-even point would keep it at 0 for good. A probing request
    therefore drafts one token per step until its own acceptance is measured; that costs little
    (one verification row, and nothing when the proposer finds no draft) and is the only way to
    learn alpha.

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
    base = {r.request_id: _floor_k(r) for r in requests}
    num_requests, context = len(requests), sum(r.context_tokens for r in requests)
    num_drafts = sum(base.values())
    kept = math.fsum(expected_kept_tokens(r.alpha, base[r.request_id]) for r in requests)
    best = kept / step_time(num_requests, num_requests + num_drafts, context, num_drafts)
    # Heap of each free request's next increment: (-gain, j, index); j before index spreads ties.
    heap = [(-r.alpha ** (base[r.request_id] + 1), base[r.request_id] + 1, i) for i, r in enumerate(requests)
            if r.pinned_k is None and r.alpha >= min_alpha and base[r.request_id] < r.k_max]
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


def _floor_k(request: SpecRequest) -> int:
    if request.pinned_k is not None:
        return request.pinned_k
    return 1 if request.is_probing and request.k_max > 0 else 0
