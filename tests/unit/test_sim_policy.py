"""The simulator's placement shortcuts: choosing among the least loaded instances picks exactly
what the router's ranking (or ``load_key``) of every instance picks, and a seeded run's records
do not change."""

from __future__ import annotations

import random

import pytest

from splitserve.cluster.store import WorkerLoad
from splitserve.config import SimConfig
from splitserve.router.placement import load_key, rank_decode, rank_prefill
from splitserve.sim import policy
from splitserve.sim.instances import ColocatedInstance, DecodeInstance, PrefillInstance
from splitserve.sim.policy import RouterRankings, choose_colocated, worker_ids
from splitserve.sim.profile import DecodeCoefficients, InstanceProfile, Triple
from splitserve.sim.results import to_records
from splitserve.sim.simulator import simulate
from tests.unit.test_sim_simulator import chat, profile

FLAT = InstanceProfile(1, Triple(18.0, 0.0, 0.0), DecodeCoefficients(Triple(20.0, 0.0, 0.0), Triple(20.0, 0.0, 0.0),
                                                                      threshold=8), 1000)
SLOPED = InstanceProfile(1, Triple(18.0, 0.1, 7e-6), DecodeCoefficients(Triple(20.0, 6e-4, 0.04),
                                                                        Triple(7.0, 6e-4, 0.16), threshold=8), 1000)


def every_prefill(rankings: RouterRankings, instances: list[PrefillInstance], num_prompt_tokens: int) -> int:
    """The router's ranking of every instance (what the simulator did before the shortcut)."""
    ids = rankings._prefill_ids
    loads = {id_: WorkerLoad(p.queued_tokens, 0, 0, 0, updated_at=0.0) for id_, p in zip(ids, instances)}
    best = rank_prefill(ids, num_prompt_tokens, {}, 1, loads, {}, rankings._prefill_models)[0]
    return rankings._index[best.worker_id]


def every_decode(rankings: RouterRankings, instances: list[DecodeInstance], num_prompt_tokens: int) -> int:
    ids = rankings._decode_ids
    loads = {id_: WorkerLoad(0, d.num_requests, max(d.profile.kv_capacity_tokens - d.committed_kv, 0),
                             d.profile.kv_capacity_tokens, updated_at=0.0) for id_, d in zip(ids, instances)}
    return rankings._index[rank_decode(ids, num_prompt_tokens, 1, loads, {}, rankings._decode_models)[0].worker_id]


@pytest.mark.parametrize("instance", [FLAT, SLOPED], ids=["flat (every load ties)", "sloped"])
def test_the_shortcut_chooses_what_ranking_every_instance_chooses(instance):
    rng = random.Random(5)
    for _ in range(2000):
        n = rng.randint(1, 12)
        prefill = [PrefillInstance(instance, queued_tokens=rng.choice([0, 0, 100, 500, rng.randint(0, 900)]))
                   for _ in range(n)]
        decode = [DecodeInstance(instance) for _ in range(n)]
        for d in decode:
            d.num_incoming = rng.choice([0, 0, 1, 2, rng.randint(0, 20)])
            d.committed_kv = rng.choice([0, 500, 900, 1000, rng.randint(0, 1000)])
        rankings = RouterRankings(prefill, decode)
        prompt = rng.choice([1, 50, 99, 200, rng.randint(1, 999)])
        assert rankings.choose_prefill(prefill, prompt) == every_prefill(rankings, prefill, prompt)
        assert rankings.choose_decode(decode, prompt) == every_decode(rankings, decode, prompt)


@pytest.mark.parametrize("config", [SimConfig(num_prefill=6, num_decode=5), SimConfig(num_prefill=3, num_decode=4)],
                         ids=["6P+5D", "3P+4D"])
def test_a_seeded_runs_records_are_those_of_ranking_every_instance(config, monkeypatch):
    requests = chat(rate=40.0, num_requests=1500, seed=11)

    def run() -> list[dict]:
        return [r.to_dict() for r in to_records(simulate(profile(kv_capacity=20_000), config, requests))]

    fast = run()
    monkeypatch.setattr(policy.RouterRankings, "choose_prefill", every_prefill)
    monkeypatch.setattr(policy.RouterRankings, "choose_decode", every_decode)
    assert run() == fast


def test_the_colocated_shortcut_chooses_the_least_load_key_of_every_instance():
    rng = random.Random(9)
    for _ in range(2000):
        n = rng.randint(1, 12)
        instances = [ColocatedInstance(SLOPED) for _ in range(n)]
        ids = worker_ids("c", n)
        for c in instances:
            c.load()  # a cached report, which the changes below must renew
            c.num_unfinished = rng.choice([0, 1, 1, 2, rng.randint(0, 9)])
            c.queued_tokens = rng.choice([0, 0, 100, rng.randint(0, 900)])
            c.decode.reserved_kv = rng.choice([0, 0, 500, rng.randint(0, 1000)])
        every = min(range(n), key=lambda i: load_key(ids[i], instances[i].num_unfinished, WorkerLoad(
            instances[i].queued_tokens, instances[i].num_unfinished, 1000 - instances[i].decode.reserved_kv, 1000)))
        assert choose_colocated(ids, instances) == every
