"""Speculation: the router's side of per-request k -- the start k of a new request, tracking
the requests it runs on each decode worker, feeding their streamed counters to the
SpecController, pushing the k values it changes to the workers, and each request's k history
for its report.

The decisions are the SpecController's (pure, splitserve.router.spec_control); this part reads
the workers' published limits and step models from the ClusterView and talks to the actors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from splitserve.engine.sampling_params import SamplingParams
from splitserve.protocol import GenerateDelta
from splitserve.router.cluster_view import ClusterView
from splitserve.router.spec_control import SpecController


class Speculation:
    def __init__(self, view: ClusterView, interval_s: float = 0.25, metrics: Any = None):
        self.view = view
        self.controller = SpecController(interval_s)
        self.metrics = metrics
        self.num_k_changes = 0
        self._k_history: dict[str, list[int]] = {}  # per request in flight

    def start_params(self, worker_id: str, request_id: str, num_prompt_tokens: int,
                     params: SamplingParams) -> SamplingParams:
        """The request's parameters for this worker: an unpinned request starts at the k the
        controller would give it in the worker's current batch (not the worker's default)."""
        if params.num_speculative_tokens is not None:
            return params
        models = self.view.models_of(worker_id)
        k = self.controller.initial_k(worker_id, request_id, num_prompt_tokens, models.speculation.k_max,
                                      models.decode_step, self.view.inflight[worker_id])
        return params if k is None else dataclasses.replace(params, num_speculative_tokens=k)

    def track(self, worker_id: str, request_id: str, num_prompt_tokens: int, params: SamplingParams,
              started: SamplingParams) -> None:
        """Follow a request the worker now runs with ``started`` (params: what the client asked)."""
        limits = self.view.models_of(worker_id).speculation
        if limits.k_max <= 0:
            return
        initial = started.num_speculative_tokens
        initial = limits.k_default if initial is None else initial
        self.controller.add(worker_id, request_id, num_prompt_tokens, initial, params.num_speculative_tokens)
        self._k_history[request_id] = [initial]

    def observe(self, worker_id: str, handle: Any, delta: GenerateDelta) -> None:
        """Feed a delta's counters to the controller; push any k it changed to the worker."""
        if delta.finished:
            self.controller.remove(worker_id, delta.request_id)
            return
        models = self.view.models_of(worker_id)
        changed = self.controller.observe(worker_id, delta.request_id, len(delta.token_ids), delta.num_draft_tokens,
                                          delta.num_accepted_tokens, models.speculation.k_max, models.decode_step)
        for request_id, k in changed.items():
            self._push(handle, request_id, k)

    def _push(self, handle: Any, request_id: str, k: int) -> None:
        handle.set_speculation.remote(request_id, k)  # applies from the worker's next step
        self._k_history.setdefault(request_id, []).append(k)
        self.num_k_changes += 1
        if self.metrics is not None:
            self.metrics.observe_k(k)

    def hold(self, worker_id: str, handle: Any, request_id: str, ks: dict[str, int]) -> None:
        """Apply a local prefill's speculation lengths to the worker's requests until
        ``release`` (its first token), pushing those that change."""
        for rid, k in self.controller.hold(worker_id, request_id, ks).items():
            self._push(handle, rid, k)

    def release(self, worker_id: str, request_id: str) -> None:
        self.controller.release(worker_id, request_id)

    def untrack(self, worker_id: str, request_id: str) -> None:
        """The request left the worker."""
        self.controller.remove(worker_id, request_id)

    def k_history(self, request_id: str) -> tuple[int, ...]:
        return tuple(self._k_history.get(request_id, ()))

    def forget(self, request_id: str) -> None:
        """The request is over: drop its history."""
        self._k_history.pop(request_id, None)
