"""Router-decision parity of the simulator's disaggregated and colocated modes (elastic mode has
its own, test_sim_elastic.py): over one seeded trace, every instance the simulator chooses is
the one the router's own code chooses over the same state -- the real ``Placer`` (disaggregated:
``place(local=False)``, which the Router calls before its Handoff) and the real
``ClusterView.least_loaded`` (colocated), each over a ``ClusterView`` of a ``MemoryStore`` that
the simulated workers report to, deciding at every arrival just before the simulator does. The
loads and the router's in-flight counts are counted here from the instances' raw state and the
requests' moments, not from the simulator's own bookkeeping.

Where the simulator differs on purpose: by default (DistServe's order) it picks the decode
instance when the prefill ends, while the router picks it at arrival, with the prefill worker;
there only the prefill choice is compared. ``decode_choice="arrival"`` follows the router's
order, and there both are."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from splitserve.cluster.embedded_store import MemoryStore
from splitserve.cluster.store import WorkerInfo, WorkerLoad
from splitserve.config import PlacementConfig, SimConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.protocol import SLO
from splitserve.router.cluster_view import ClusterView
from splitserve.router.handoff import RoutedRequest
from splitserve.router.placer import Placer
from splitserve.router.spec_control import SpecController
from splitserve.sim.colocated import Colocated
from splitserve.sim.disaggregated import Disaggregated
from splitserve.sim.instances import Job
from splitserve.sim.policy import decode_model, prefill_model, worker_ids
from splitserve.sim.profile import DecodeCoefficients, InstanceProfile, LatencyProfile, Triple
from splitserve.sim.simulator import simulate
from splitserve.sim.trace import SimRequest

# ms: a prefill of n tokens 20 + 0.5 n (+ a little attention); a decode step 15 + 2 B + a little
# context. Decode KV is small (3000 tokens), so decode instances fill up and the router's "no
# room" group is exercised; prefill instances hold any prompt of the trace.
INSTANCE = InstanceProfile(1, Triple(20.0, 0.5, 1e-5), DecodeCoefficients(Triple(15.0, 1e-3, 2.0),
                                                                          Triple(15.0, 1e-3, 2.0), 8), 3000)
PROFILE = LatencyProfile("test-model", "test-gpu", "test", (INSTANCE,))


def trace(num_requests: int = 200, rate: float = 25.0, seed: int = 7) -> list[SimRequest]:
    """Short and long prompts, one-token to long outputs, Poisson arrivals."""
    rng, t, requests = random.Random(seed), 0.0, []
    for i in range(num_requests):
        t += rng.expovariate(rate)
        requests.append(SimRequest(i, t, rng.choice([30, 120, 400, 900]), rng.choice([1, 2, 20, 120])))
    return requests


class ShadowCluster:
    """The router's view of the simulated workers: a MemoryStore they report to and a
    ClusterView reading it, refreshed at every decision."""

    def __init__(self) -> None:
        self.store = MemoryStore()
        self.view = ClusterView(self.store, get_actor=lambda name: None)

    def report(self, worker_id: str, kind: str, load: WorkerLoad, models: list) -> None:
        self.store.register_worker(WorkerInfo(worker_id, kind, worker_id, "", "node"), 1e6)
        self.store.report(worker_id, 1e6, load, {m.NAME: m.to_coefficients() for m in models})

    def refresh(self) -> None:
        asyncio.run(self.view.refresh(force=True))


# ------------------------------------------------------------------------------ disaggregated


class ShadowDisaggregated(ShadowCluster):
    """The real Placer, as the Router calls it in disaggregated mode (``place(local=False)``),
    over what the simulated workers would report; its in-flight counts (a request at its prefill
    worker until its first token, at its decode worker until its end) and its ledger
    (``PlacedRequests``: placed, first token, done) kept as the Router keeps them."""

    def __init__(self) -> None:
        super().__init__()
        self.placer = Placer(self.view, SpecController(), 1, PlacementConfig(), default_slo=SLO())
        self.decided: dict[int, tuple[str, str]] = {}
        self.jobs: list[Job] = []  # arrived, in order
        self.first_tokens: set[int] = set()
        self.done: set[int] = set()
        self.num_with_a_full_worker = 0  # decisions where some decode worker had no room for the prompt
        self.sim: Disaggregated | None = None

    def decide(self, job: Job, sim: Disaggregated) -> None:
        self._sync(sim)
        r = job.request
        if any(load.num_free_blocks < r.prompt_tokens + 1 for w, load in self.view.loads.items() if w[0] == "d"):
            self.num_with_a_full_worker += 1
        req = RoutedRequest(str(r.index), list(range(r.prompt_tokens)), _params(job), SLO(), 0.0)
        placement = asyncio.run(self.placer.place(req, local=False))
        self.decided[r.index] = (placement.prefill_worker, placement.decode_worker)

    def chosen(self, job: Job, sim: Disaggregated) -> None:
        self.jobs.append(job)
        self.sim = sim

    def _sync(self, sim: Disaggregated) -> None:
        """The workers report, the view reads them; the router's counts from the requests' moments."""
        p_ids, d_ids = _ids(sim)
        inflight, tokens, kv = Counter(), Counter(), Counter()
        for job in self.jobs:
            index, prefill_id = job.request.index, p_ids[job.prefill_instance]
            decode_id = None if job.decode_instance is None else d_ids[job.decode_instance]
            if job.prefill_end_s is None:
                inflight[prefill_id] += 1
                tokens[prefill_id] += job.request.prompt_tokens
            elif index not in self.first_tokens and decode_id is not None:  # the Router, at the first token
                self.first_tokens.add(index)
                self.placer.decoding(decode_id, str(index), SLO(), _params(job))
            if decode_id is None:
                continue
            if job.finish_s is None:
                inflight[decode_id] += 1
                kv[decode_id] += job.kv_tokens  # the simulator's model: a request commits its final KV
            elif index not in self.done:
                self.done.add(index)
                self.placer.done(decode_id, str(index))
                self.placer.forget(str(index))
        for worker_id, instance in zip(p_ids, sim.prefill):
            capacity = instance.profile.kv_capacity_tokens
            waiting = sum(j.request.prompt_tokens for j in instance.waiting)
            running = sum(j.num_prefilled + n for j, n in instance.batch)
            load = WorkerLoad(waiting, len(instance.waiting) + len(instance.batch), capacity - running, capacity)
            self.report(worker_id, "prefill", load, [prefill_model(instance.profile)])
        for worker_id, instance in zip(d_ids, sim.decode):
            capacity = instance.profile.kv_capacity_tokens
            load = WorkerLoad(0, inflight[worker_id], max(capacity - kv[worker_id], 0), capacity)
            self.report(worker_id, "decode", load, [decode_model(instance.profile)])
        self.refresh()
        for counter, counts in ((self.view.inflight, inflight), (self.view.inflight_tokens, tokens)):
            counter.clear()
            counter.update(counts)


def _ids(sim: Disaggregated) -> tuple[list[str], list[str]]:
    width = max(len(sim.prefill), len(sim.decode))
    return worker_ids("p", len(sim.prefill), width), worker_ids("d", len(sim.decode), width)


def _params(job: Job) -> SamplingParams:
    return SamplingParams(max_tokens=job.request.output_tokens, ignore_eos=True)  # as the load tester sends


def _shadowed(monkeypatch: pytest.MonkeyPatch, cls: type, shadow) -> None:
    """The shadow decides at every arrival, on the state just before the simulator decides."""
    arrive = cls.arrive

    def arrive_shadowed(self, now: float, job: Job) -> None:
        shadow.decide(job, self)
        arrive(self, now, job)
        shadow.chosen(job, self)

    monkeypatch.setattr(cls, "arrive", arrive_shadowed)


@pytest.mark.parametrize(("decode_choice", "prefill_batching"), [("arrival", "whole-prompts"),
                                                                  ("arrival", "chunked"),
                                                                  ("prefill-end", "whole-prompts")])
def test_disaggregated_choices_are_the_real_placers_over_the_same_state(decode_choice, prefill_batching,
                                                                         monkeypatch):
    shadow = ShadowDisaggregated()
    _shadowed(monkeypatch, Disaggregated, shadow)
    config = SimConfig(num_prefill=2, num_decode=3, decode_choice=decode_choice, prefill_batching=prefill_batching,
                       max_batched_tokens=256)
    result = simulate(PROFILE, config, trace())
    assert len(shadow.jobs) == len(result.jobs)
    p_ids, d_ids = worker_ids("p", 2, 3), worker_ids("d", 3)
    for job in shadow.jobs:
        router_prefill, router_decode = shadow.decided[job.request.index]
        assert p_ids[job.prefill_instance] == router_prefill, f"request {job.request.index}"
        if decode_choice == "arrival":  # prefill-end: chosen later, on other state (the module docstring)
            assert d_ids[job.decode_instance] == router_decode, f"request {job.request.index}"
    # The trace exercises the choices: every instance chosen, and decode instances without room.
    assert {job.prefill_instance for job in shadow.jobs} == {0, 1}
    assert {job.decode_instance for job in shadow.jobs if job.request.output_tokens > 1} == {0, 1, 2}
    assert shadow.num_with_a_full_worker > 0
    # What was committed at the decode instances came back (one-token requests' too).
    assert shadow.sim is not None
    assert all(d.committed_kv == 0 and d.num_incoming == 0 for d in shadow.sim.decode)


def test_the_router_order_flags_are_disaggregated_ones(capsys):
    from splitserve.cli import build_parser, main
    from splitserve.sim.cli import sim_config

    args = build_parser().parse_args(["simulate", "--profile", "p.json", "--rates", "1", "--decode-choice", "arrival",
                                      "--prefill-batching", "chunked", "--max-num-seqs", "64"])
    config = sim_config(args)
    assert (config.decode_choice, config.prefill_batching, config.max_num_seqs) == ("arrival", "chunked", 64)
    for flag, value in (("--decode-choice", "arrival"), ("--prefill-batching", "chunked")):
        assert main(["simulate", "--profile", "p.json", "--rates", "1", "--mode", "colocated", flag, value]) == 2
        assert f"{flag} does not apply to --mode colocated" in capsys.readouterr().err


# ------------------------------------------------------------------------------ colocated


class ShadowColocated(ShadowCluster):
    """The real ClusterView's ``least_loaded("colocated")`` -- what the Router's colocated path
    asks first -- over what the simulated workers would report (worker/engine_loop.py: the
    waiting prompts' tokens, the unfinished requests, free KV) and the requests this router has
    at each (every unfinished one)."""

    def __init__(self) -> None:
        super().__init__()
        self.decided: dict[int, str] = {}
        self.chosen_ids: dict[int, str] = {}

    def decide(self, job: Job, sim: Colocated) -> None:
        for worker_id, instance in zip(sim.worker_ids, sim.instances):
            capacity = instance.profile.kv_capacity_tokens
            unfinished = len(instance.waiting) + len(instance.prefilling) + instance.decode.size
            waiting = sum(j.request.prompt_tokens for j in instance.waiting)
            load = WorkerLoad(waiting, unfinished, capacity - instance.decode.reserved_kv, capacity)
            self.report(worker_id, "colocated", load, [prefill_model(instance.profile)])
            self.view.inflight[worker_id] = unfinished
        self.refresh()
        self.decided[job.request.index] = self.view.least_loaded("colocated")[0]

    def chosen(self, job: Job, sim: Colocated) -> None:
        self.chosen_ids[job.request.index] = sim.worker_ids[job.prefill_instance]


@pytest.mark.parametrize("scheduler", ["chunked", "prefill-first"])
def test_colocated_choices_are_the_cluster_views_least_loaded(scheduler, monkeypatch):
    shadow = ShadowColocated()
    _shadowed(monkeypatch, Colocated, shadow)
    config = SimConfig(mode="colocated", num_instances=3, colocated_scheduler=scheduler, max_batched_tokens=512)
    simulate(PROFILE, config, trace(rate=12.0))
    assert shadow.chosen_ids == shadow.decided
    assert set(shadow.chosen_ids.values()) == {"c0", "c1", "c2"}
