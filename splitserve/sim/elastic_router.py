"""The elastic router's decisions over simulated instances: each arriving request's placement by
``router.placement_inputs.choose_placement`` (the Placer's own decision code, which ends in
``prefill_placement.place``) and the pools' roles by ``router.roles.balanced_move``, fed with
what the real router would know of the simulated cluster, built as the Placer builds it:

- each instance's load as its worker reports it (``WorkerLoad``: prompt tokens it has yet to
  prefill, the requests it holds in any phase -- those placed to decode there from their
  placement on, as a worker counts a reservation --, its free KV in tokens: block size 1),
  read fresh at every decision (a real router's view is up to a refresh interval old);
- its models, built once from the profile (``mixed_model``: the profile's fitted mixed-step
  model, or the derived formula's linear form);
- this router's requests there: in flight (a local request from placement to its end; a remote
  one at its prefill instance until its first token, at its decode instance until its end),
  prompt tokens queued (placement to first token), and a ``PlacedRequests`` fed as the Router
  feeds the Placer's (placed, first token, tokens streamed, end).

Nothing learned: correction factors stay 1.0 (the profile is the truth, so observed over
predicted has nothing to correct but the router models' own approximations of it) and the
exposed KV transfer the router averages stays 0. No speculation, no prefix cache.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from splitserve.cluster.store import WorkerLoad
from splitserve.config import PlacementConfig, RoleConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.latency import MixedStepModel
from splitserve.protocol import SLO
from splitserve.router.placement import load_key
from splitserve.router.placement_inputs import PlacedRequests, WorkerState, choose_placement
from splitserve.router.prefill_placement import Corrections, Placement
from splitserve.router.roles import Move, RoleStats, balanced_move
from splitserve.sim.policy import decode_model, prefill_model
from splitserve.sim.profile import InstanceProfile

_S = 1e-3  # profiles are in ms, the router's models in seconds
BLOCK_SIZE = 1  # KV is counted in tokens


def mixed_model(profile: InstanceProfile) -> MixedStepModel:
    """The router's mixed-step model of an instance: the profile's fitted one, or the linear form
    of the derived formula (the decode step's small-batch triple plus the prefill's per-token
    and attention terms). The derived formula itself differs from that form only where nothing
    decodes (it pays the prefill constant, not the decode one) and by the context term of a
    chunk's start; the simulation is timed by the formula, the router predicts with the form."""
    m = profile.mixed
    if m is not None:
        values = {"const": m.const, "requests": m.requests, "decode_tokens": m.decode_tokens, "draft_tokens": 0.0,
                  "prefill_tokens": m.prefill_tokens, "prefill_attention": m.prefill_attention,
                  "context_tokens": m.context_tokens}
    else:
        d, p = profile.decode.small, profile.prefill
        values = {"const": d.a, "requests": 0.0, "decode_tokens": d.b + d.c, "draft_tokens": 0.0,
                  "prefill_tokens": p.b, "prefill_attention": p.c, "context_tokens": d.b}
    return MixedStepModel.from_coefficients({name: value * _S for name, value in values.items()})


class SimulatedWorker(Protocol):
    """What the router reads of a simulated instance (sim/elastic.py's ElasticInstance)."""

    worker_id: str
    role: str
    profile: InstanceProfile

    def load(self) -> WorkerLoad: ...


class ElasticRouter:
    """One router's knowledge and decisions over the simulated instances (module docstring)."""

    def __init__(self, workers: Sequence[SimulatedWorker], slo: SLO, placement: PlacementConfig, roles: RoleConfig):
        self.workers = {w.worker_id: w for w in workers}
        self.slo, self.config, self.role_config = slo, placement, roles
        self.models = {w.worker_id: (prefill_model(w.profile), decode_model(w.profile), mixed_model(w.profile))
                       for w in workers}
        self.requests = PlacedRequests()
        self.corrections = Corrections(placement.correction_weight, placement.correction_bounds,
                                       placement.tail_quantile, placement.tail_window)
        self.inflight: Counter[str] = Counter()  # this router's requests at each worker
        self.inflight_tokens: Counter[str] = Counter()  # prompt tokens it has queued at each
        self.stats = RoleStats()
        self.moved_at = 0.0  # the starting split gets a full dwell, as RoleBalancer's

    def pool(self, role: str) -> list[str]:
        return [w for w, instance in self.workers.items() if instance.role == role]

    def state_of(self, worker_id: str, now: float) -> WorkerState:
        """The worker as the Placer's ``state_of`` builds it."""
        load = self.workers[worker_id].load()
        prefill, decode, mixed = self.models[worker_id]
        batch = self.requests.batch_at(worker_id, self.inflight[worker_id])
        num_decoding = max(load.num_running_requests, batch)
        running = self.requests.running_at(worker_id, num_decoding, now, self.slo, _not_speculating)
        return WorkerState(worker_id, load, prefill, decode, mixed, queued_tokens=self.inflight_tokens[worker_id],
                           batch=batch, running=running)

    def place(self, request_id: str, num_prompt_tokens: int, params: SamplingParams, now: float) -> Placement:
        """Where the request's prefill runs (CapacityError: refused), recorded as the Placer
        records it."""
        prefill = [self.state_of(w, now) for w in self.pool("prefill")]
        decode = [self.state_of(w, now) for w in self.pool("decode")]
        placement = choose_placement(num_prompt_tokens, self.slo, prefill, decode, {}, BLOCK_SIZE, self.corrections,
                                     0.0, self.config)
        self.inflight_tokens[placement.prefill_worker] += num_prompt_tokens
        self.requests.placed(request_id, placement, self.slo, params)
        self.inflight[placement.prefill_worker] += 1
        if placement.decode_worker != placement.prefill_worker:
            self.inflight[placement.decode_worker] += 1
        return placement

    def first_token(self, request_id: str, placement: Placement, num_prompt_tokens: int, params: SamplingParams,
                    now: float) -> None:
        self.inflight_tokens[placement.prefill_worker] -= num_prompt_tokens
        if placement.decode_worker != placement.prefill_worker:
            self.inflight[placement.prefill_worker] -= 1  # the prefill visit ends with the hand-off
        self.requests.decoding(placement.decode_worker, request_id, self.slo, params, now)

    def finished(self, request_id: str, placement: Placement, num_prompt_tokens: int, num_output_tokens: int) -> None:
        self.inflight[placement.decode_worker] -= 1
        self.requests.done(placement.decode_worker, request_id)
        self.requests.forget(request_id)
        self.stats.observe(self.models[placement.prefill_worker][0].predict(num_prompt_tokens), num_output_tokens)

    def next_move(self, now: float) -> Move | None:
        """``balanced_move`` on what this router saw, as RoleBalancer.next_move calls it."""
        prefill_pool, decode_pool = self.pool("prefill"), self.pool("decode")
        decode_models = [self.models[w][1] for w in decode_pool]
        running = [self.workers[w].load().num_running_requests for w in decode_pool]
        return balanced_move(prefill_pool, decode_pool, self.stats, decode_models, running, self.role_config,
                             now - self.moved_at, self._least_loaded)

    def _least_loaded(self, pool: list[str]) -> str:
        return min(pool, key=lambda w: load_key(w, self.inflight[w], self.workers[w].load()))


def _not_speculating(_worker_id: str, _request_id: str) -> None:
    return None
