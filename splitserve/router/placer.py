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

The facts become ``WorkerState``s and the decision is ``placement_inputs.choose_placement``'s,
and what it placed is kept in a ``PlacedRequests``: pure code the simulator calls too.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable

from splitserve.config import PlacementConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import ServingError
from splitserve.protocol import SLO
from splitserve.router.cluster_view import ClusterView
from splitserve.router.handoff import RoutedRequest
from splitserve.router.placement import prompt_block_hashes
from splitserve.router.placement_inputs import PlacedRequests, WorkerState, choose_placement
from splitserve.router.prefill_placement import TTFT, Corrections, Placement, Running
from splitserve.router.spec_control import SpecController

_TRANSFER_WEIGHT = 0.2  # how fast the exposed-transfer average follows new hand-offs


class Placer:
    def __init__(self, view: ClusterView, controller: SpecController, block_size: int, config: PlacementConfig,
                 default_slo: SLO, clock: Callable[[], float] = time.monotonic):
        self.view, self.controller, self.block_size, self.config = view, controller, block_size, config
        self.default_slo, self.clock = default_slo, clock
        self.corrections = Corrections(config.correction_weight, config.correction_bounds, config.tail_quantile,
                                       config.tail_window)
        self.transfer_s = 0.0  # the exposed part of a KV hand-off, averaged
        self.requests = PlacedRequests()  # what this router placed, per worker

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
        placement = choose_placement(n, req.slo, [self.state_of(w) for w in prefill_ids],
                                     [self.state_of(w) for w in decode_ids], cached, self.block_size,
                                     self.corrections, self.transfer_s, self.config, local, req.tried)
        # Counted at once (no await since the facts were read), so a burst's next request sees it.
        self.view.inflight_tokens[placement.prefill_worker] += n
        self.requests.placed(req.request_id, placement, req.slo, req.params)
        return placement

    def state_of(self, worker_id: str) -> WorkerState:
        """The worker as a placement sees it: its ClusterView facts and this router's requests there."""
        view, models = self.view, self.view.models_of(worker_id)
        num_decoding = self.decoding_at(worker_id)
        k_max = models.speculation.k_max
        return WorkerState(
            worker_id, view.loads.get(worker_id), models.prefill, models.decode_step, models.mixed_step,
            queued_tokens=view.inflight_tokens[worker_id], batch=self.batch_at(worker_id),
            running=self.running_at(worker_id, num_decoding),
            num_draft_tokens=self.controller.drafts_per_step(worker_id),
            choose_ks=functools.partial(self.controller.best_ks, worker_id, k_max) if k_max > 0 else None)

    def decoding_at(self, worker_id: str) -> int:
        """The requests decoding at the worker: as it last reported, or this router's there if more."""
        load = self.view.loads.get(worker_id)
        return max(load.num_running_requests if load else 0, self.batch_at(worker_id))

    def batch_at(self, worker_id: str) -> int:
        """This router's requests that decode at the worker or will (``PlacedRequests.batch_at``)."""
        return self.requests.batch_at(worker_id, self.view.inflight[worker_id])

    def running_at(self, worker_id: str, num_decoding: int) -> tuple[Running, ...]:
        """The requests decoding at the worker (``num_decoding`` of them, as it reported) that
        have a TPOT SLO, as the TPOT guard sees them now."""
        return self.requests.running_at(worker_id, num_decoding, self.clock(), self.default_slo,
                                        self.controller.speculating)

    # ------------------------------------------------------------ what placed requests did

    def decoding(self, worker_id: str, request_id: str, slo: SLO, params: SamplingParams) -> None:
        """The request decodes at the worker from its first token, now (its TPOT SLO protects
        it there)."""
        self.requests.decoding(worker_id, request_id, slo, params, self.clock())

    def streamed(self, worker_id: str, request_id: str, num_output_tokens: int) -> None:
        """The request has produced ``num_output_tokens`` tokens in all."""
        self.requests.streamed(worker_id, request_id, num_output_tokens)

    def done(self, worker_id: str, request_id: str) -> None:
        self.requests.done(worker_id, request_id)

    def forget(self, request_id: str) -> None:
        """The request is over (whether or not it ever decoded)."""
        self.requests.forget(request_id)

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

