"""What an elastic placement decides on, built from plain facts (pure code, no Ray, no store):
the Placer fills it from its ClusterView, the simulator (splitserve.sim) from its simulated
instances, and both then decide with the same functions.

- ``PlacedRequests``: the requests one router placed and streams, per worker -- those
  decoding (since their first token: SLO, tokens streamed, seconds since the first) and those
  placed to decode there whose first token is still to come, with what the local prefills
  placed after them promised them. It answers a worker's batch (``batch_at``) and its running
  requests as the TPOT guard sees them (``running_at``), and records a placement (``placed``).
- ``WorkerState``: one worker as a placement sees it -- its last reported load, its models,
  the prompt tokens queued there, this router's batch there and its running requests.
- ``elastic_options`` / ``choose_placement``: the best remote pair and every local option from
  the WorkerStates of both pools, and ``prefill_placement.place`` over them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from splitserve.cluster.store import WorkerLoad
from splitserve.config import PlacementConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import CapacityError
from splitserve.latency import DecodeStepModel, MixedStepModel, PrefillModel
from splitserve.protocol import SLO
from splitserve.router.goodput import StepTime
from splitserve.router.placement import blocks_for, rank_decode, rank_prefill
from splitserve.router.prefill_placement import (
    LOCAL,
    NO_PREDICTION_RETRY_S,
    REMOTE,
    TTFT,
    Corrections,
    LocalSide,
    Placement,
    Remote,
    Running,
    place,
    remote_chunk,
)


@dataclass
class _Decoding:
    """A request a router streams from a worker, since its first token."""

    tpot_slo_s: float
    first_at: float
    params: SamplingParams
    num_output_tokens: int = 1

    def running(self, now: float, request_id: str, speculating: tuple[float, int] | None) -> Running:
        """As the TPOT guard sees it (``speculating``: its acceptance and k, where it drafts)."""
        certain = self.params.max_tokens - self.num_output_tokens if self.params.ignore_eos else None
        alpha, k = speculating or (0.0, 0)
        return Running(self.tpot_slo_s, self.num_output_tokens - 1, now - self.first_at, certain,
                       request_id=request_id, alpha=alpha, k=k)


@dataclass
class _Pending:
    """A request placed to decode at a worker, before its first token: what the local prefills
    placed there after it promised it."""

    worker_id: str
    tpot_slo_s: float | None
    params: SamplingParams
    promised_s: float = 0.0
    promised_steps: int = 0

    def running(self) -> Running | None:
        if self.tpot_slo_s is None:
            return None
        certain = self.params.max_tokens - 1 if self.params.ignore_eos else None
        return Running(self.tpot_slo_s, tokens_left=certain, pending=True, promised_s=self.promised_s,
                       promised_steps=self.promised_steps)


class PlacedRequests:
    """One router's placed requests per worker (see the module docstring); no clock of its
    own: the caller says when ``now`` is."""

    def __init__(self) -> None:
        self._decoding: dict[str, dict[str, _Decoding | None]] = {}  # worker -> request (None: no TPOT SLO)
        self._pending: dict[str, _Pending] = {}  # request -> where it will decode, until its first token

    def placed(self, request_id: str, placement: Placement, slo: SLO, params: SamplingParams) -> None:
        """A request was placed: its chunks promise their delay to the requests pending where
        they run, and it is pending at its decode worker."""
        if placement.extra_steps:
            for pending in self._pending.values():
                if pending.worker_id == placement.prefill_worker:
                    pending.promised_s += placement.extra_decode_s
                    pending.promised_steps += placement.extra_steps
        self._pending[request_id] = _Pending(placement.decode_worker, slo.tpot_s, params)

    def decoding(self, worker_id: str, request_id: str, slo: SLO, params: SamplingParams, now: float) -> None:
        """The request decodes at the worker from its first token, ``now``."""
        self._pending.pop(request_id, None)
        tracked = None if slo.tpot_s is None else _Decoding(slo.tpot_s, now, params)
        self._decoding.setdefault(worker_id, {})[request_id] = tracked

    def streamed(self, worker_id: str, request_id: str, num_output_tokens: int) -> None:
        tracked = self._decoding.get(worker_id, {}).get(request_id)
        if tracked is not None:
            tracked.num_output_tokens = num_output_tokens

    def done(self, worker_id: str, request_id: str) -> None:
        self._decoding.get(worker_id, {}).pop(request_id, None)

    def forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def batch_at(self, worker_id: str, inflight: int) -> int:
        """The router's requests that decode at the worker or will: ``inflight`` (its requests in
        flight there), or, if more, those streaming from it and those placed to decode there
        whose first token is still to come (a burst's hand-offs do not reach their decode
        worker at once)."""
        pending = sum(p.worker_id == worker_id for p in self._pending.values())
        return max(inflight, len(self._decoding.get(worker_id, {})) + pending)

    def running_at(self, worker_id: str, num_decoding: int, now: float, default_slo: SLO,
                   speculating: Callable[[str, str], tuple[float, int] | None]) -> tuple[Running, ...]:
        """The requests decoding at the worker (``num_decoding`` of them, as it reported) that
        have a TPOT SLO, as the TPOT guard sees them ``now``; requests another router runs there
        count as just started under ``default_slo``."""
        known = self._decoding.get(worker_id, {})
        pending = [p for p in self._pending.values() if p.worker_id == worker_id]
        running = [d.running(now, rid, speculating(worker_id, rid)) for rid, d in known.items() if d is not None]
        running += [r for p in pending if (r := p.running()) is not None]
        if default_slo.tpot_s is not None:
            running += [Running(default_slo.tpot_s)] * max(num_decoding - len(known) - len(pending), 0)
        return tuple(running)


@dataclass(frozen=True)
class WorkerState:
    """One worker as a placement sees it. load: as it last reported (None: not yet);
    queued_tokens: prompt tokens this router has queued there for prefill; batch: this router's
    requests that decode there or will (``PlacedRequests.batch_at``); running: the requests
    decoding there, as the TPOT guard sees them (``PlacedRequests.running_at`` of
    ``num_decoding``); num_draft_tokens / k_max / choose_ks: its speculation (none: 0, 0, None)."""

    worker_id: str
    load: WorkerLoad | None
    prefill: PrefillModel | None
    decode_step: DecodeStepModel | None
    mixed_step: MixedStepModel | None
    queued_tokens: int = 0
    batch: int = 0
    running: tuple[Running, ...] = ()
    num_draft_tokens: int = 0
    choose_ks: Callable[[StepTime], Mapping[str, int]] | None = None

    @property
    def num_decoding(self) -> int:
        """The requests decoding there: as it last reported, or this router's there if more."""
        return max(self.load.num_running_requests if self.load else 0, self.batch)


def local_side(worker: WorkerState, num_prompt_tokens: int, cached_blocks: int, block_size: int,
               corrections: Corrections) -> LocalSide | None:
    """The worker as the place of this prompt's prefill beside its decode batch (corrected as its
    local prefills); None when it reported no room for the prompt."""
    load, n = worker.load, num_prompt_tokens
    if load is not None and load.num_free_blocks < blocks_for(n, block_size):
        return None
    w = worker.worker_id
    return LocalSide(
        w, worker.mixed_step, worker.num_decoding, worker.num_draft_tokens, context_tokens=worker.num_decoding * n,
        queued_prefill_tokens=max(load.num_queued_prompt_tokens if load else 0, worker.queued_tokens),
        cached_tokens=min(cached_blocks * block_size, n - 1), running=worker.running,
        ttft_correction=corrections.factor(w, TTFT[LOCAL]), tpot_correction=corrections.factor(w, "tpot"),
        tpot_tail=corrections.tail(w, "tpot"), choose_ks=worker.choose_ks)


def best_remote(prefill: Sequence[WorkerState], decode: Sequence[WorkerState], num_prompt_tokens: int,
                cached: Mapping[str, int], block_size: int, at: Mapping[str, LocalSide | None],
                corrections: Corrections, transfer_s: float, config: PlacementConfig,
                tried: set[str] | frozenset[str] = frozenset()) -> Remote | None:
    """The best remote pair (``at``: each worker as the place of a prefill beside its decodes;
    ``transfer_s``: the exposed part of a hand-off); None when every prefill worker decodes
    requests that no chunk of this prompt would leave within their TPOT SLO -- without
    admission, the best of their smallest-chunk plans then, marked unguarded."""
    n = num_prompt_tokens
    loads = {w.worker_id: w.load for w in (*prefill, *decode) if w.load is not None}
    decode_ids = [w.worker_id for w in decode]
    decode_models = {w.worker_id: w.decode_step for w in decode if w.decode_step is not None}
    batches = {w.worker_id: w.batch for w in decode}
    best = rank_decode(decode_ids, n, block_size, loads, batches, decode_models, tried, cached=cached)[0]
    tpot = best.predicted_s * corrections.factor(best.worker_id, "tpot")
    decode_batch = next(w.num_decoding for w in decode if w.worker_id == best.worker_id)
    prefill_models = {w.worker_id: w.prefill for w in prefill if w.prefill is not None}
    queued = {w.worker_id: w.queued_tokens for w in prefill}
    options, unguarded = [], []
    for choice in rank_prefill([w.worker_id for w in prefill], n, cached, block_size, loads, queued, prefill_models,
                               tried):
        worker_id, factor = choice.worker_id, corrections.factor(choice.worker_id, TTFT[REMOTE])
        model = prefill_models.get(worker_id)
        margin = 0.0 if model is None else config.margin_sigmas * model.fit().rmse
        side = at[worker_id]
        if side is None or not side.running or side.model is None:
            options.append(Remote(worker_id, best.worker_id, choice.predicted_s * factor + margin + transfer_s, tpot,
                                  decode_batch=decode_batch))
            continue
        # It decodes too: chunks its requests absorb, its remote prefills' correction; else (no
        # admission) its smallest chunks, at the cost of their delay.
        side = replace(side, ttft_correction=factor)
        if (plan := remote_chunk(side, n, config)) is not None:
            options.append(_chunked_remote(plan, best.worker_id, tpot, transfer_s, decode_batch))
        elif not config.admission and (plan := remote_chunk(side, n, config, protect=False)) is not None:
            unguarded.append(_chunked_remote(plan, best.worker_id, tpot, transfer_s, decode_batch, guarded=False))
    if not options:  # place it all the same, as well as the predictions allow (``place`` weighs it)
        options = unguarded
    tried_last = [o for o in options if o.prefill_worker not in tried] or options
    return min(tried_last, key=lambda o: (o.ttft_s, o.prefill_worker), default=None)


def _chunked_remote(plan: Placement, decode_worker: str, tpot_s: float, transfer_s: float, decode_batch: int,
                    guarded: bool = True) -> Remote:
    """A hand-off whose prompt is prefilled in ``plan``'s chunks (``remote_chunk``) beside the
    requests its prefill worker decodes, and what those chunks cost them."""
    return Remote(plan.prefill_worker, decode_worker, plan.predicted_ttft_s + transfer_s, tpot_s, plan.chunk_tokens,
                  plan.extra_decode_s, plan.extra_steps, plan.cost_s - plan.predicted_ttft_s, decode_batch, guarded)


def choose_placement(num_prompt_tokens: int, slo: SLO, prefill: Sequence[WorkerState], decode: Sequence[WorkerState],
                     cached: Mapping[str, int], block_size: int, corrections: Corrections, transfer_s: float,
                     config: PlacementConfig, local: bool = True,
                     tried: set[str] | frozenset[str] = frozenset()) -> Placement:
    """Where the request's prefill runs, from both pools' WorkerStates (``local``: whether a
    worker may run it end to end; ``cached``: the prompt's blocks in each worker's prefix
    cache); CapacityError when no option meets its SLO."""
    n = num_prompt_tokens
    workers = {w.worker_id: w for w in (*decode, *prefill)}
    # Each worker as the place of this prompt's prefill (None: no room), read once for both uses.
    at = {w: local_side(state, n, cached.get(w, 0), block_size, corrections) for w, state in workers.items()}
    remote = best_remote(prefill, decode, n, cached, block_size, at, corrections, transfer_s, config, tried) \
        if prefill and decode else None
    sides = [side for w, side in at.items() if side is not None and w not in tried] if local else []
    if remote is None and prefill and not sides:
        raise CapacityError("every prefill worker decodes requests that no chunk of this prompt would leave "
                            "within their TPOT SLO; retry later or relax the SLO", retry_after_s=NO_PREDICTION_RETRY_S)
    return place(n, slo, remote, sides, config)
