"""Elastic mode of the simulator: the router's own placement decides each request (parity with
the real Placer over a ClusterView of the same state, decision by decision), every request
finishes or is refused with its tokens, KV stays within capacity, one result per seed, local
prefill where the prefill pool is queued, remote where local chunks would break the running
requests' TPOT, roles following a load shift, and bad flags named. Profiles are built here."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import replace

import pytest

from splitserve.cluster.embedded_store import MemoryStore
from splitserve.cluster.store import WorkerInfo, WorkerLoad
from splitserve.config import PlacementConfig, RoleConfig, SimConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import CapacityError
from splitserve.latency import DecodeStepModel, MixedStepModel, PrefillModel
from splitserve.protocol import SLO
from splitserve.router.cluster_view import ClusterView
from splitserve.router.handoff import RoutedRequest
from splitserve.router.placer import Placer
from splitserve.router.prefill_placement import LOCAL, REMOTE, Placement
from splitserve.router.spec_control import SpecController
from splitserve.sim.elastic import ElasticInstance
from splitserve.sim.elastic_router import ElasticRouter, mixed_model
from splitserve.sim.instances import Job
from splitserve.sim.policy import decode_model, prefill_model
from splitserve.sim.profile import DecodeCoefficients, InstanceProfile, LatencyProfile, Triple
from splitserve.sim.results import to_records
from splitserve.sim.simulator import simulate
from splitserve.sim.trace import SimRequest

# ms: a prefill of n tokens 20 + n; a decode step of B requests 20 + 3 B; a chunk adds 1 per token.
INSTANCE = InstanceProfile(1, Triple(20.0, 1.0, 0.0), DecodeCoefficients(Triple(20.0, 0.0, 3.0),
                                                                         Triple(20.0, 0.0, 3.0), 1), 6000)
PROFILE = LatencyProfile("test-model", "test-gpu", "test", (INSTANCE,), kv_bytes_per_token=1e3,
                         kv_transfer_bytes_per_s=1e7)
SLO_ = SLO(ttft_s=1.0, tpot_s=0.06)
ROLES = RoleConfig(interval_s=1.0, min_dwell_s=5.0)
CONFIG = SimConfig(mode="elastic", num_prefill=1, num_decode=2, max_batched_tokens=512,
                   placement=PlacementConfig(margin_sigmas=0.0), roles=ROLES)


def trace(num_requests: int = 200, rate: float = 12.0, seed: int = 0) -> list[SimRequest]:
    """Short and long prompts, short and long outputs, Poisson arrivals."""
    rng, t, requests = random.Random(seed), 0.0, []
    for i in range(num_requests):
        t += rng.expovariate(rate)
        requests.append(SimRequest(i, t, rng.choice([30, 120, 400, 900]), rng.choice([2, 20, 120])))
    return requests


def kind_of(job: Job) -> str:
    return "refused" if job.refusal else ("local" if job.prefill_instance == job.decode_instance else "remote")


# ------------------------------------------------------------------------------ router parity


class ShadowRouter:
    """The real Placer over a ClusterView (a MemoryStore the simulated workers report to),
    following the simulation as the Router follows its requests, deciding at every arrival
    before the simulator does. Its loads and visits are counted here from the instances' raw
    state and the requests' moments, not from the simulator's router bookkeeping."""

    def __init__(self, slo: SLO, config: PlacementConfig):
        self.now = 0.0
        self.store = MemoryStore()
        self.view = ClusterView(self.store, get_actor=lambda name: None)
        self.placer = Placer(self.view, SpecController(), 1, config, default_slo=slo, clock=lambda: self.now)
        self.slo, self.decisions, self.held = slo, {}, Counter()  # held: requests a worker holds, any phase
        self.streaming: dict[int, Job] = {}
        self.simulated: dict[int, Placement] = {}
        self.instances: list[ElasticInstance] = []

    def arriving(self, now: float, job: Job, instances: list[ElasticInstance]) -> None:
        self.sync(now, instances)
        self.decide(job)

    def sync(self, now: float, instances: list[ElasticInstance]) -> None:
        """The workers report, the view reads them, the streamed tokens arrive."""
        self.now, self.instances = now, instances
        for inst in instances:
            self.store.register_worker(WorkerInfo(inst.worker_id, inst.role, inst.worker_id, "", "node"), 1e6)
            queued = sum(p.job.request.prompt_tokens - p.job.num_prefilled for p in [*inst.waiting, *inst.prefilling])
            capacity = inst.profile.kv_capacity_tokens
            load = WorkerLoad(queued, self.held[inst.worker_id], capacity - inst.decode.reserved_kv, capacity)
            models = {PrefillModel.NAME: prefill_model(inst.profile), DecodeStepModel.NAME: decode_model(inst.profile),
                      MixedStepModel.NAME: mixed_model(inst.profile)}
            self.store.report(inst.worker_id, 1e6, load, {name: m.to_coefficients() for name, m in models.items()})
        asyncio.run(self.view.refresh(force=True))
        for index, j in self.streaming.items():
            self.placer.streamed(self._worker(j.decode_instance), str(index), self._tokens(j, now))

    def decide(self, job: Job) -> None:
        r = job.request
        req = RoutedRequest(str(r.index), list(range(r.prompt_tokens)), _params(job), self.slo, self.now)
        try:
            placement = asyncio.run(self.placer.place(req))
        except CapacityError as refusal:
            self.decisions[r.index] = str(refusal)
            return
        self.decisions[r.index] = placement
        for worker in {placement.prefill_worker, placement.decode_worker}:
            self.view.inflight[worker] += 1
            self.held[worker] += 1

    def first_token(self, now: float, job: Job, placement: Placement) -> None:
        self.now = now
        decided = self.decisions[job.request.index]
        assert decided == placement, f"request {job.request.index}: the Placer: {decided}, simulated: {placement}"
        self.view.inflight_tokens[placement.prefill_worker] -= job.request.prompt_tokens
        if placement.kind == REMOTE:
            self.view.inflight[placement.prefill_worker] -= 1
            self.held[placement.prefill_worker] -= 1
        self.placer.decoding(placement.decode_worker, str(job.request.index), self.slo, _params(job))
        self.streaming[job.request.index] = job
        self.simulated[job.request.index] = placement  # what the simulator decided for it

    def finished(self, now: float, job: Job, placement: Placement) -> None:
        self.view.inflight[placement.decode_worker] -= 1
        self.held[placement.decode_worker] -= 1
        self.placer.done(placement.decode_worker, str(job.request.index))
        self.placer.forget(str(job.request.index))
        self.streaming.pop(job.request.index)

    def _worker(self, index: int | None) -> str:
        assert index is not None
        return self.instances[index].worker_id

    def _tokens(self, job: Job, now: float) -> int:
        """Tokens streamed by ``now``: the first, then one per decode step since it joined a batch."""
        decode = self.instances[job.decode_instance]
        local = job.prefill_instance == job.decode_instance
        landed = local or job.prefill_end_s + job.transfer_s < now
        if not landed or job in decode.incoming:
            return 1
        return 1 + len(decode.decode.step_ends) - job.first_step


def _params(job: Job) -> SamplingParams:
    return SamplingParams(max_tokens=job.request.output_tokens, ignore_eos=True)  # as the load tester sends


def test_every_decision_is_the_real_placers_over_the_same_state():
    shadow = ShadowRouter(SLO_, CONFIG.placement)
    result = simulate(PROFILE, CONFIG, trace(), SLO_, observer=shadow)
    for job in result.jobs:
        index = job.request.index
        if job.refusal is not None:
            assert shadow.decisions[index] == job.refusal, f"request {index}"
        else:  # the whole Placement: kind, workers, chunk size, predictions, cost
            assert shadow.decisions[index] == shadow.simulated[index], f"request {index}"
    kinds = Counter(kind_of(job) for job in result.jobs)
    assert kinds["local"] and kinds["remote"] and kinds["refused"], kinds


# ------------------------------------------------------------------------------ invariants


def test_every_request_finishes_with_its_tokens_or_is_counted_refused_and_kv_stays_within_capacity():
    requests = trace(num_requests=300, rate=20.0, seed=3)
    result = simulate(PROFILE, CONFIG, requests, SLO_)
    records = to_records(result)
    refused = [r for r in records if r.status == "refused"]
    finished = [r for r in records if r.status == "ok"]
    assert len(refused) + len(finished) == len(requests) and refused and finished
    assert all(r.error and r.output_tokens == 0 for r in refused)
    by_index = {r.index: r for r in requests}
    assert all(r.output_tokens == by_index[r.index].output_tokens for r in finished)
    assert sum(r.output_tokens for r in finished) == sum(by_index[r.index].output_tokens for r in finished)
    for stats in result.instances:  # every iteration asserted it on the way (DecodeBatch.observe_kv / reserve)
        assert 0 < stats.peak_kv_tokens <= stats.kv_capacity_tokens


def test_one_result_per_seed():
    def run(seed: int):
        result = simulate(PROFILE, CONFIG, trace(seed=seed), SLO_)
        return [(j.finish_s, j.refusal, j.prefill_instance, j.decode_instance) for j in result.jobs], result.role_moves

    assert run(1) == run(1)
    assert run(1) != run(2)


# ------------------------------------------------------------------------------ constructed cases


def _router(num_running_at_decode: int, tpot_slo_s: float, queued_at_prefill: int) -> tuple[ElasticRouter, list]:
    """w0 in the prefill pool with ``queued_at_prefill`` prompt tokens to prefill; w1 in the
    decode pool with ``num_running_at_decode`` requests just started (that may end at any step)."""
    workers = [ElasticInstance("w0", 0, "prefill", INSTANCE), ElasticInstance("w1", 1, "decode", INSTANCE)]
    workers[0].queued_tokens = queued_at_prefill
    router = ElasticRouter(workers, SLO(ttft_s=1.0, tpot_s=tpot_slo_s), PlacementConfig(margin_sigmas=0.0), ROLES)
    for i in range(num_running_at_decode):
        params = SamplingParams(max_tokens=100)
        router.requests.decoding("w1", f"r{i}", router.slo, params, now=0.0)
        router.inflight["w1"] += 1
    workers[1].num_unfinished = num_running_at_decode
    return router, workers


def test_local_prefill_wins_when_the_prefill_pool_is_queued():
    # w0 has 5000 tokens to prefill (over 5 s); w1's 4 requests absorb 64-token chunks.
    router, _ = _router(num_running_at_decode=4, tpot_slo_s=0.1, queued_at_prefill=5000)
    placement = router.place("new", 200, SamplingParams(max_tokens=10, ignore_eos=True), now=0.0)
    assert (placement.kind, placement.decode_worker) == (LOCAL, "w1") and placement.chunk_tokens < 200


def test_remote_wins_when_local_chunks_would_break_the_running_requests_tpot():
    # w1's requests allow 40 ms a step (35 ms with the newcomer): no chunk fits there. An idle w0
    # would run the request end to end rather than hand it to a busier worker (elastic's
    # ``_undominated``), so w0 has no room for its KV here: the hand-off is what is left.
    router, workers = _router(num_running_at_decode=4, tpot_slo_s=0.04, queued_at_prefill=0)
    workers[0].decode.reserve(INSTANCE.kv_capacity_tokens - 100)
    placement = router.place("new", 200, SamplingParams(max_tokens=10, ignore_eos=True), now=0.0)
    assert (placement.kind, placement.prefill_worker, placement.decode_worker) == (REMOTE, "w0", "w1")
    # Looser TPOT at w1: its requests absorb chunks, and prefilling it there costs less than waiting.
    router, workers = _router(num_running_at_decode=4, tpot_slo_s=0.1, queued_at_prefill=2000)
    workers[0].decode.reserve(INSTANCE.kv_capacity_tokens - 100)
    assert router.place("new", 200, SamplingParams(max_tokens=10, ignore_eos=True), now=0.0).kind == LOCAL


def test_roles_follow_a_load_shift_and_a_moving_instance_keeps_what_it_holds():
    # Long prompts with one output token: all prefill work, so decode instances move to the
    # prefill pool (one decode instance always stays); nothing is dropped on the way.
    rng = random.Random(0)
    requests = [SimRequest(i, i * 0.05, rng.choice([800, 900]), 2) for i in range(600)]
    config = replace(CONFIG, num_prefill=1, num_decode=3, placement=PlacementConfig(admission=False))
    result = simulate(PROFILE, config, requests, SLO())
    assert result.role_moves and all(role == "prefill" for _, _, role in result.role_moves)
    assert result.role_moves[1][0] - result.role_moves[0][0] >= ROLES.min_dwell_s
    assert all(job.finish_s is not None and job.refusal is None for job in result.jobs)
    fixed = simulate(PROFILE, replace(config, roles=replace(ROLES, enabled=False)), requests, SLO())
    assert not fixed.role_moves


@pytest.mark.parametrize(("flags", "message"), [
    (["--mode", "elastic", "--instances", "2"], "--instances does not apply to --mode elastic"),
    (["--mode", "disaggregated", "--role-dwell-s", "3"], "--role-dwell-s does not apply to --mode disaggregated"),
    (["--mode", "colocated", "--fixed-roles"], "--fixed-roles does not apply to --mode colocated"),
    (["--mode", "colocated", "--prefill-chunk-tokens", "256"], "--prefill-chunk-tokens does not apply to --mode "
     "colocated"),
])
def test_flags_of_another_mode_are_named(flags, message, tmp_path, capsys):
    from splitserve.cli import main

    assert main(["simulate", "--profile", str(tmp_path / "missing.json"), "--rates", "1", *flags]) == 2
    assert message in capsys.readouterr().err


def test_bad_role_values_are_refused_by_the_parser(capsys):
    from splitserve.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--profile", "p.json", "--rates", "1", "--mode", "elastic", "--role-hysteresis", "-1"])
    assert exit_info.value.code == 2
    assert "--role-hysteresis: expected a number >= 0" in capsys.readouterr().err


def test_prefill_chunk_sizes_reach_the_placement_and_bad_ones_the_parser(capsys):
    from splitserve.cli import build_parser, main
    from splitserve.sim.cli import sim_config

    args = build_parser().parse_args(["simulate", "--profile", "p.json", "--rates", "1", "--mode", "elastic",
                                      "--prefill-chunk-tokens", "2048,512"])
    assert sim_config(args).placement.chunk_tokens == (2048, 512)
    assert sim_config(args).placement.admission  # serve's default
    open_door = build_parser().parse_args(["simulate", "--profile", "p.json", "--rates", "1", "--mode", "elastic",
                                           "--no-admission"])
    assert not sim_config(open_door).placement.admission
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--profile", "p.json", "--rates", "1", "--mode", "elastic", "--prefill-chunk-tokens", "0"])
    assert exit_info.value.code == 2
    assert "--prefill-chunk-tokens: expected comma-separated whole numbers >= 1, got '0'" in capsys.readouterr().err

