"""Placer: the router's side of elastic prefill placement -- it gathers, from the ClusterView,
the facts ``prefill_placement.place`` decides on, and learns from what each placed request
then did.

For a request it reads the prompt's prefix-cache hits per worker (one store read), ranks the
prefill pool by predicted TTFT and the decode pool by predicted TPOT (placement.py) -- a
prefill worker that decodes requests of its own takes the prompt only in chunks they absorb
(``remote_chunk``) -- and
describes every worker with room for the prompt, of either pool, as a local option: its mixed-step
model, the requests decoding there (and their drafts per step, from the speculation
controller, which also chooses their k under a step with a chunk in it, so chunk size and k
are chosen together), the prompt tokens it has queued, and -- for the TPOT guard -- where each request
this router runs there stands against its TPOT SLO (tokens streamed, seconds since its first,
tokens still due when it ignores EOS; requests other routers run there count as just started
under the default SLO). A request placed to decode at a worker counts in its batch, and is
protected there, before its first token too, as pending: each local prefill placed there after it adds its delay to what
it was promised, so a burst's later prompts cannot take the TPOT of its earlier ones. The
chosen prefill worker counts the prompt as queued (``ClusterView.inflight_tokens``) from the
decision until the router sees its first token, so the next request of a burst is placed
knowing it.
After the request it folds observed over predicted TTFT and TPOT into the workers' correction
factors (TTFT apart for a worker's remote prefills and its local ones, whose errors differ: a
hand-off's prefill runs alone, a local one beside a decode batch) and the KV transfer's
exposed wait into a running average.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from splitserve.config import PlacementConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import CapacityError, ServingError
from splitserve.protocol import SLO
from splitserve.router.cluster_view import ClusterView
from splitserve.router.handoff import RoutedRequest
from splitserve.router.placement import (
    blocks_for,
    prompt_block_hashes,
    rank_decode,
    rank_prefill,
)
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
from splitserve.router.spec_control import SpecController

_TRANSFER_WEIGHT = 0.2  # how fast the exposed-transfer average follows new hand-offs


@dataclass
class _Decoding:
    """A request this router streams from a worker, since its first token."""

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


class Placer:
    def __init__(self, view: ClusterView, controller: SpecController, block_size: int, config: PlacementConfig,
                 default_slo: SLO, clock: Callable[[], float] = time.monotonic):
        self.view, self.controller, self.block_size, self.config = view, controller, block_size, config
        self.default_slo, self.clock = default_slo, clock
        self.corrections = Corrections(config.correction_weight, config.correction_bounds, config.tail_quantile,
                                       config.tail_window)
        self.transfer_s = 0.0  # the exposed part of a KV hand-off, averaged
        self._decoding: dict[str, dict[str, _Decoding | None]] = {}  # worker -> request (None: no TPOT SLO)
        self._pending: dict[str, _Pending] = {}  # request -> where it will decode, until its first token

    async def place(self, req: RoutedRequest, local: bool = True) -> Placement:
        """Where the request's prefill runs (``local``: whether a worker may run it end to end);
        CapacityError when no option meets its SLO, ServingError when a pool it needs is empty."""
        n = len(req.prompt_ids)
        # Elastic (``local``): every worker can run a request end to end, so one pool may be empty.
        prefill_ids = self.view.members("prefill") if local else self.view.ids("prefill")
        decode_ids = self.view.members("decode") if local else self.view.ids("decode")
        if not prefill_ids and not decode_ids:
            raise ServingError("no live worker")
        hashes = prompt_block_hashes(req.prompt_ids, self.block_size)
        cached = await asyncio.to_thread(self.view.store.match_prefix, hashes) if hashes else {}
        # Each worker as the place of this prompt's prefill (None: no room), read once for both uses.
        at = {w: self._side(req, w, cached) for w in dict.fromkeys([*decode_ids, *prefill_ids])}
        remote = self._remote(req, prefill_ids, decode_ids, cached, at) if prefill_ids and decode_ids else None
        sides = [side for w, side in at.items() if side is not None and w not in req.tried] if local else []
        if remote is None and prefill_ids and not sides:
            raise CapacityError("every prefill worker decodes requests that no chunk of this prompt would leave "
                                "within their TPOT SLO; retry later or relax the SLO",
                                retry_after_s=NO_PREDICTION_RETRY_S)
        placement = place(n, req.slo, remote, sides, self.config)
        # Counted at once (no await since the facts were read), so a burst's next request sees it.
        self.view.inflight_tokens[placement.prefill_worker] += n
        if placement.extra_steps:  # its chunks delay what decodes where it is prefilled
            for pending in self._pending.values():
                if pending.worker_id == placement.prefill_worker:
                    pending.promised_s += placement.extra_decode_s
                    pending.promised_steps += placement.extra_steps
        self._pending[req.request_id] = _Pending(placement.decode_worker, req.slo.tpot_s, req.params)
        return placement

    def _remote(self, req: RoutedRequest, prefill_ids: Sequence[str], decode_ids: Sequence[str],
                cached: dict[str, int], at: dict[str, LocalSide | None]) -> Remote | None:
        """The best remote pair (``at``: each worker as the place of a prefill beside its
        decodes); None when every prefill worker decodes requests that no chunk of this prompt
        would leave within their TPOT SLO."""
        view, n = self.view, len(req.prompt_ids)
        decode_models = {w: m for w in decode_ids if (m := view.models_of(w).decode_step) is not None}
        batches = {w: self.batch_at(w) for w in decode_ids}
        decode = rank_decode(decode_ids, n, self.block_size, view.loads, batches, decode_models, req.tried,
                             cached=cached)[0]
        tpot = decode.predicted_s * self.corrections.factor(decode.worker_id, "tpot")
        decode_batch = self.decoding_at(decode.worker_id)
        prefill_models = {w: m for w in prefill_ids if (m := view.models_of(w).prefill) is not None}
        options, unguarded = [], []
        for prefill in rank_prefill(prefill_ids, n, cached, self.block_size, view.loads, view.inflight_tokens,
                                    prefill_models, req.tried):
            worker_id, factor = prefill.worker_id, self.corrections.factor(prefill.worker_id, TTFT[REMOTE])
            model = prefill_models.get(worker_id)
            margin = 0.0 if model is None else self.config.margin_sigmas * model.fit().rmse
            plain = Remote(worker_id, decode.worker_id, prefill.predicted_s * factor + margin + self.transfer_s, tpot,
                           decode_batch=decode_batch)
            side = at[worker_id]
            if side is None or not side.running or side.model is None:
                options.append(plain)
            elif (chunked := remote_chunk(replace(side, ttft_correction=factor), n, self.config)) is not None:
                # it decodes too: guarded chunks, its remote prefills' correction
                options.append(Remote(worker_id, decode.worker_id, chunked.predicted_ttft_s + self.transfer_s, tpot,
                                      chunked.chunk_tokens, chunked.extra_decode_s, chunked.extra_steps,
                                      chunked.cost_s - chunked.predicted_ttft_s, decode_batch))
            else:
                unguarded.append(plain)
        if not options and not self.config.admission:  # place it all the same, as well as the predictions allow
            options = unguarded
        tried_last = [o for o in options if o.prefill_worker not in req.tried] or options
        return min(tried_last, key=lambda o: (o.ttft_s, o.prefill_worker), default=None)

    def _side(self, req: RoutedRequest, worker_id: str, cached: dict[str, int]) -> LocalSide | None:
        """The worker as the place of this prompt's prefill beside its decode batch (corrected as
        its local prefills); None when it has no room for the prompt."""
        view, n = self.view, len(req.prompt_ids)
        load = view.loads.get(worker_id)
        if load is not None and load.num_free_blocks < blocks_for(n, self.block_size):
            return None
        num_decoding = self.decoding_at(worker_id)
        k_max = view.models_of(worker_id).speculation.k_max
        return LocalSide(
            worker_id, view.models_of(worker_id).mixed_step, num_decoding,
            self.controller.drafts_per_step(worker_id), context_tokens=num_decoding * n,
            queued_prefill_tokens=max(load.num_queued_prompt_tokens if load else 0, view.inflight_tokens[worker_id]),
            cached_tokens=min(cached.get(worker_id, 0) * self.block_size, n - 1),
            running=self.running_at(worker_id, num_decoding),
            ttft_correction=self.corrections.factor(worker_id, TTFT[LOCAL]),
            tpot_correction=self.corrections.factor(worker_id, "tpot"),
            tpot_tail=self.corrections.tail(worker_id, "tpot"),
            choose_ks=functools.partial(self.controller.best_ks, worker_id, k_max) if k_max > 0 else None,
        )

    def decoding_at(self, worker_id: str) -> int:
        """The requests decoding at the worker: as it last reported, or this router's there if more."""
        load = self.view.loads.get(worker_id)
        return max(load.num_running_requests if load else 0, self.batch_at(worker_id))

    def batch_at(self, worker_id: str) -> int:
        """The requests of this router that decode at the worker or will: those in flight there,
        or, if more, those streaming from it and those placed to decode there whose first token
        is still to come (a burst's hand-offs do not reach their decode worker at once)."""
        pending = sum(p.worker_id == worker_id for p in self._pending.values())
        return max(self.view.inflight[worker_id], len(self._decoding.get(worker_id, {})) + pending)

    def running_at(self, worker_id: str, num_decoding: int) -> tuple[Running, ...]:
        """The requests decoding at the worker (``num_decoding`` of them, as it reported) that
        have a TPOT SLO, as the TPOT guard sees them now."""
        known, now = self._decoding.get(worker_id, {}), self.clock()
        pending = [p for p in self._pending.values() if p.worker_id == worker_id]
        running = [d.running(now, rid, self.controller.speculating(worker_id, rid))
                   for rid, d in known.items() if d is not None]
        running += [r for p in pending if (r := p.running()) is not None]
        if self.default_slo.tpot_s is not None:  # requests another router runs there
            running += [Running(self.default_slo.tpot_s)] * max(num_decoding - len(known) - len(pending), 0)
        return tuple(running)

    # ------------------------------------------------------------ what placed requests did

    def decoding(self, worker_id: str, request_id: str, slo: SLO, params: SamplingParams) -> None:
        """The request decodes at the worker from its first token, now (its TPOT SLO protects
        it there)."""
        self._pending.pop(request_id, None)
        tracked = None if slo.tpot_s is None else _Decoding(slo.tpot_s, self.clock(), params)
        self._decoding.setdefault(worker_id, {})[request_id] = tracked

    def streamed(self, worker_id: str, request_id: str, num_output_tokens: int) -> None:
        """The request has produced ``num_output_tokens`` tokens in all."""
        tracked = self._decoding.get(worker_id, {}).get(request_id)
        if tracked is not None:
            tracked.num_output_tokens = num_output_tokens

    def done(self, worker_id: str, request_id: str) -> None:
        self._decoding.get(worker_id, {}).pop(request_id, None)

    def forget(self, request_id: str) -> None:
        """The request is over (whether or not it ever decoded)."""
        self._pending.pop(request_id, None)

    def observe_transfer(self, seconds: float) -> None:
        self.transfer_s += _TRANSFER_WEIGHT * (seconds - self.transfer_s)

    def observe(self, placement: Placement, ttft_s: float, tpot_s: float | None) -> tuple[float | None, float | None]:
        """Fold a finished request's observed TTFT and TPOT into the corrections; the observed
        over predicted ratios (None where nothing was predicted or measured)."""
        self.corrections.observe(placement.prefill_worker, TTFT[placement.kind], placement.predicted_ttft_s, ttft_s)
        if tpot_s is not None:
            self.corrections.observe(placement.decode_worker, "tpot", placement.predicted_tpot_s, tpot_s)
        return _ratio(ttft_s, placement.predicted_ttft_s), None if tpot_s is None else \
            _ratio(tpot_s, placement.predicted_tpot_s)


def _ratio(actual: float, predicted: float) -> float | None:
    return actual / predicted if 0 < predicted < math.inf else None

