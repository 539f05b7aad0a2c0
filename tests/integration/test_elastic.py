"""End to end in elastic mode (the default): real Ray workers that can each prefill and decode,
real gRPC and HTTP front ends, the real model.

A burst of concurrent prompts is placed both ways -- some prefilled remotely and handed off,
some prefilled locally by the worker that decodes them, inside its decode batch -- and every
greedy output equals the offline engine's whatever its placement, over either front end. (Which
requests go where depends on step times fitted on this machine, so the tests turn every other
decision into the other kind; the decision rules themselves are asserted on constructed models
in tests/unit/test_prefill_placement.py.) A worker moved
between pools under load loses no request, and every worker's blocks are idle afterwards.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from splitserve.config import ClusterConfig, RoleConfig, ServeConfig, StoreConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.client import GenerationClient, make_request
from splitserve.router.prefill_placement import LOCAL, REMOTE, Placement
from splitserve.server import Server
from tests.conftest import PROMPTS
from tests.integration.test_serving import ENGINE, wait_idle

pytestmark = pytest.mark.slow

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server(ray_cluster):
    store = StoreConfig(prefix=f"elastic-{uuid.uuid4().hex[:8]}", ttl_s=15.0)
    # The pools stay as started unless a test moves them (the balancer's rule is unit-tested).
    options = ServeConfig(grpc_port=0, http_port=0, grace_s=5.0, roles=RoleConfig(enabled=False))
    s = Server(ClusterConfig(engine=ENGINE, store=store), options).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def expected(llm) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))]


@pytest.fixture(autouse=True)
def _idle_after(server):
    yield
    wait_idle(server)


def grpc_request(address: str, prompt: str):
    """The request's output ids and its report."""
    with GenerationClient(address) as client:
        responses = list(client.generate(make_request(prompt, max_tokens=MAX_TOKENS, temperature=0)))
    return [t for r in responses for t in r.token_ids], responses[-1].report


def http_request(port: int, prompt: str):
    body = json.dumps({"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    return answer["choices"][0]["text"], answer["splitserve_report"]


def burst(fn, *args, prompts=PROMPTS) -> list:
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: fn(*args, p), prompts))


def samples(server: Server, name: str, label: str) -> dict[str, float]:
    families = text_string_to_metric_families(server.metrics.render().decode())
    return {s.labels[label]: s.value for f in families for s in f.samples if s.name == name}


def placements(server: Server) -> dict[str, float]:
    return samples(server, "splitserve_placements_total", "placement")


def roles(server: Server) -> dict[str, str]:
    return {w: s.kind for w, s in server.call(server.deployment.worker_statuses()).items()}


@contextlib.contextmanager
def placed_both_ways(server: Server) -> Iterator[None]:
    """Each request placed as the router decides, then turned into the other kind every other
    request: remote and local alternate within one burst, however this machine's fitted step
    times make the router decide (its rules are asserted on constructed models in
    tests/unit/test_prefill_placement.py). The router's own bookkeeping follows the change."""
    placer, view = server.router.placer, server.router.view
    decide, count = placer.place, itertools.count()

    async def place(req, local: bool = True) -> Placement:
        chosen = await decide(req, local)
        want = REMOTE if next(count) % 2 == 0 else LOCAL
        if chosen.kind == want:
            return chosen
        decode = chosen.decode_worker
        other = next(w for w in sorted({*view.ids("prefill"), *view.ids("decode")}) if w != decode)
        turned = replace(chosen, kind=LOCAL, prefill_worker=decode, chunk_tokens=64) if want == LOCAL else \
            replace(chosen, kind=REMOTE, prefill_worker=other, chunk_tokens=None)
        view.inflight_tokens[chosen.prefill_worker] -= len(req.prompt_ids)
        view.inflight_tokens[turned.prefill_worker] += len(req.prompt_ids)
        return turned

    placer.place = place
    try:
        yield
    finally:
        placer.place = decide


def test_a_burst_is_placed_both_ways_with_the_offline_engines_output(server, expected):
    before = placements(server)
    with placed_both_ways(server):
        results = burst(grpc_request, server.address)
    assert [ids for ids, _ in results] == expected
    reports = [report for _, report in results]
    kinds = [r.placement for r in reports]
    assert "local" in kinds and "remote" in kinds, kinds
    for r in reports:
        assert r.predicted_ttft_s > 0 and r.ttft_s > 0 and r.decode_worker
        if r.placement == "local":
            assert r.prefill_worker == r.decode_worker and r.transfer_s == 0
        else:
            assert r.prefill_worker != r.decode_worker and r.handoff_attempts >= 1
    after = placements(server)
    assert sum(after.values()) - sum(before.values()) == len(PROMPTS)


def test_the_http_front_end_places_a_burst_both_ways_too(server, llm):
    texts = [o.text for o in llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))]
    with placed_both_ways(server):
        results = burst(http_request, server.http_port)
    assert [text for text, _ in results] == texts
    kinds = [report["placement"] for _, report in results]
    assert "local" in kinds and "remote" in kinds, kinds


def test_a_worker_moved_between_pools_under_load_loses_no_request(server, expected):
    handles = server.deployment.handles
    statuses = server.call(server.deployment.worker_statuses())
    prefill_id = next(w for w, s in statuses.items() if s.kind == "prefill")
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(grpc_request, server.address, p) for p in PROMPTS]
        assert ray.get(handles[prefill_id].set_role.remote("decode")).kind == "decode"
        moved = [pool.submit(grpc_request, server.address, p) for p in PROMPTS[:4]]
        results = [f.result() for f in futures + moved]
    assert [ids for ids, _ in results] == expected + expected[:4]
    # Only decode workers now: every later request is prefilled locally.
    server.call(server.router.refresh(force=True))
    ids, report = grpc_request(server.address, PROMPTS[0])
    assert ids == expected[0] and report.placement == "local"
    assert ray.get(handles[prefill_id].set_role.remote("prefill")).kind == "prefill"
    server.call(server.router.refresh(force=True))
    assert burst(grpc_request, server.address, prompts=PROMPTS[:2])[0][0] == expected[0]


def test_the_balancer_moves_workers_by_the_work_it_measured(server, expected):
    from splitserve.router.roles import RoleBalancer, RoleStats

    started = roles(server)
    short_prompts = RoleStats()
    short_prompts.observe(prefill_s=0.001, num_output_tokens=500)  # decode work dwarfs prefill work
    balancer = RoleBalancer(server.router.view, short_prompts, RoleConfig(min_dwell_s=0.0), server.metrics)
    move = server.call(balancer.step())
    assert move is not None and move.to_role == "decode" and started[move.worker_id] == "prefill"
    assert set(roles(server).values()) == {"decode"}
    assert server.router.view.members("prefill") == []  # the store lists it under its new role
    ids, report = grpc_request(server.address, PROMPTS[1])
    assert ids == expected[1] and report.placement == "local"
    assert server.call(balancer.step()) is None  # balanced: nothing moves
    long_prompts = RoleStats()
    long_prompts.observe(prefill_s=5.0, num_output_tokens=1)
    balancer.stats = long_prompts
    move = server.call(balancer.step())
    assert move is not None and move.to_role == "prefill"
    assert sorted(roles(server).values()) == ["decode", "prefill"]
    assert samples(server, "splitserve_role_changes_total", "role") == {"decode": 1.0, "prefill": 1.0}
    assert burst(grpc_request, server.address, prompts=PROMPTS[:2])[1][0] == expected[1]
