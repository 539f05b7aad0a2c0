"""SpecController: the router's per-request speculation lengths, recomputed as stats arrive.

For each decode worker it tracks the requests this router runs there: their context length,
their acceptance (``AcceptanceTracker`` over the drafted/accepted counters the worker streams
back), whether the client pinned k, and the k currently applied. A request drafts at least one
token until ``PROBE_DRAFTS`` of its drafts were verified (``choose_k``'s probing), so its own
acceptance, not only its proposer's mean over other requests, decides its k. ``observe`` takes a request's
latest counters; at most every ``interval_s`` per worker it reruns ``choose_k`` over that
worker's batch with the worker's fitted step-time model and returns the k values that changed,
which the router pushes to the worker (``set_speculation``).

While a local prefill runs at a worker, placement chooses its chunk size and the k of the
requests there together (``best_ks`` under the step time with the chunk in it): ``hold``
applies those k until ``release`` (the prefill's first token), and ``decide`` leaves a held
worker alone, since its plain-step model would undo them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from splitserve.latency import DecodeStepModel
from splitserve.router.goodput import AcceptanceTracker, SpecRequest, StepTime, choose_k

PROPOSER = "decode"  # one acceptance prior per decode-side proposer kind; the workers share one here
PROBE_DRAFTS = 4  # a request drafts (k >= 1) until its own acceptance has seen this many drafts


@dataclass
class _Tracked:
    context_tokens: int
    k: int
    pinned_k: int | None
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


class SpecController:
    def __init__(self, interval_s: float = 0.25, margin: float = 0.05, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.margin = margin
        self.clock = clock
        self.acceptance = AcceptanceTracker()
        self._workers: dict[str, dict[str, _Tracked]] = {}
        self._decided_at: dict[str, float] = {}
        self._holds: dict[str, set[str]] = {}  # worker -> the local prefills holding its k

    def add(self, worker_id: str, request_id: str, num_prompt_tokens: int, initial_k: int,
            pinned_k: int | None) -> None:
        self._workers.setdefault(worker_id, {})[request_id] = _Tracked(num_prompt_tokens + 1, initial_k, pinned_k)

    def remove(self, worker_id: str, request_id: str) -> None:
        self._workers.get(worker_id, {}).pop(request_id, None)
        self.acceptance.forget(request_id)

    def observe(
        self,
        worker_id: str,
        request_id: str,
        num_new_tokens: int,
        num_draft_tokens: int,
        num_accepted_tokens: int,
        k_max: int,
        step_model: DecodeStepModel | None,
    ) -> dict[str, int]:
        """Record a request's progress (cumulative counters); return changed k per request id."""
        batch = self._workers.get(worker_id, {})
        tracked = batch.get(request_id)
        if tracked is None:
            return {}
        tracked.context_tokens += num_new_tokens
        drafted = num_draft_tokens - tracked.num_draft_tokens
        if drafted > 0:
            accepted = num_accepted_tokens - tracked.num_accepted_tokens
            self.acceptance.update(request_id, PROPOSER, drafted, min(max(accepted, 0), drafted))
        tracked.num_draft_tokens, tracked.num_accepted_tokens = num_draft_tokens, num_accepted_tokens
        now = self.clock()
        if k_max <= 0 or step_model is None or now - self._decided_at.get(worker_id, -1e9) < self.interval_s:
            return {}
        self._decided_at[worker_id] = now
        return self.decide(worker_id, k_max, step_model)

    def initial_k(self, worker_id: str, request_id: str, num_prompt_tokens: int, k_max: int,
                  step_model: DecodeStepModel | None, num_in_flight: int = 0) -> int | None:
        """The k a new unpinned request should start at on this worker: ``choose_k`` over the
        worker's batch with the request added (its acceptance at the proposer's mean), counting
        those of the ``num_in_flight`` requests the router has there that are not in the batch yet
        (still in prefill) as more like it. None without a fitted model or speculation there:
        the worker's default applies."""
        if k_max <= 0 or step_model is None:
            return None
        batch = self._spec_requests(worker_id, k_max)
        alpha = self.acceptance.estimate(request_id, PROPOSER)
        arriving = [SpecRequest(f"{request_id}#{i}", alpha, num_prompt_tokens + 1, k_max, is_probing=True)
                    for i in range(max(num_in_flight - len(batch), 0))]
        newcomer = SpecRequest(request_id, alpha, num_prompt_tokens + 1, k_max, is_probing=True)
        requests = [*batch, *arriving, newcomer]
        return choose_k(requests, step_model.predict, margin=self.margin)[request_id]

    def decide(self, worker_id: str, k_max: int, model: DecodeStepModel) -> dict[str, int]:
        batch = self._workers.get(worker_id, {})
        requests = self._spec_requests(worker_id, k_max)
        if not requests or self.is_held(worker_id):
            return {}
        chosen = choose_k(requests, model.predict, margin=self.margin)
        changed = {rid: k for rid, k in chosen.items() if batch[rid].k != k and batch[rid].pinned_k is None}
        for rid, k in changed.items():
            batch[rid].k = k
        return changed

    def best_ks(self, worker_id: str, k_max: int, step_time: StepTime) -> dict[str, int]:
        """``choose_k`` over the worker's batch under ``step_time`` (e.g. a step that carries a
        prefill chunk); pinned requests keep theirs."""
        requests = self._spec_requests(worker_id, k_max)
        return choose_k(requests, step_time, margin=self.margin) if requests and k_max > 0 else {}

    def hold(self, worker_id: str, holder: str, ks: dict[str, int]) -> dict[str, int]:
        """Apply ``ks`` to the worker's unpinned requests until ``release(worker_id, holder)``;
        return the k values that changed."""
        batch = self._workers.get(worker_id, {})
        self._holds.setdefault(worker_id, set()).add(holder)
        free = {rid: tracked for rid, tracked in batch.items() if tracked.pinned_k is None}
        changed = {rid: k for rid, k in ks.items() if rid in free and free[rid].k != k}
        for rid, k in changed.items():
            batch[rid].k = k
        return changed

    def release(self, worker_id: str, holder: str) -> None:
        """The hold is over; the next ``observe`` there decides afresh."""
        holders = self._holds.get(worker_id, set())
        if holder in holders:
            holders.discard(holder)
            self._decided_at.pop(worker_id, None)

    def is_held(self, worker_id: str) -> bool:
        return bool(self._holds.get(worker_id))

    def speculating(self, worker_id: str, request_id: str) -> tuple[float, int] | None:
        """A tracked request's acceptance estimate and k now (None: not tracked here)."""
        tracked = self._workers.get(worker_id, {}).get(request_id)
        return None if tracked is None else (self.acceptance.estimate(request_id, PROPOSER), tracked.k)

    def _spec_requests(self, worker_id: str, k_max: int) -> list[SpecRequest]:
        return [
            SpecRequest(rid, self.acceptance.estimate(rid, PROPOSER), t.context_tokens, k_max,
                        None if t.pinned_k is None else min(t.pinned_k, k_max),
                        is_probing=self.acceptance.num_drafts(rid, PROPOSER) < PROBE_DRAFTS)
            for rid, t in self._workers.get(worker_id, {}).items()
        ]

    def drafts_per_step(self, worker_id: str) -> int:
        """The drafts the requests tracked at the worker verify per step, all told (their k)."""
        return sum(t.k for t in self._workers.get(worker_id, {}).values())

    def k_of(self, worker_id: str, request_id: str) -> int | None:
        tracked = self._workers.get(worker_id, {}).get(request_id)
        return None if tracked is None else tracked.k
