"""End to end over every setup: the other transfer backend, colocated mode, the Redis store, and
the `splitserve serve` command. Each test runs its own Server (they cannot share the CPUs with
the drill server of test_serving.py, so they live in their own module)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import ray

from splitserve.config import TransferConfig
from splitserve.router.client import GenerationClient, make_request
from tests.conftest import PROMPTS
from tests.integration.conftest import free_port
from tests.integration.test_serving import expected, generate_all, start_server, wait_idle  # noqa: F401
from tests.integration.test_serving import KV_AUTH_KEY

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"transfer": TransferConfig(backend="grpc", auth_key=KV_AUTH_KEY), "redis": True},
                     id="grpc-transfer-kv-auth-redis-store"),
        pytest.param({"mode": "colocated", "redis": True}, id="colocated-redis-store"),
        pytest.param({"mode": "colocated"}, id="colocated-embedded-store"),
    ],
)
def test_other_setups_equal_offline_engine(ray_cluster, request, expected, overrides):
    overrides = dict(overrides)
    if overrides.pop("redis", False):
        overrides["redis_url"] = request.getfixturevalue("redis_url")
    s = start_server(**overrides)
    try:
        assert generate_all(s.address) == expected
        if "redis_url" in overrides and s.config.mode == "disaggregated":
            check_second_router_replica(s, overrides["redis_url"], expected)
            check_router_replica_process_needs_no_torch(s, overrides["redis_url"], expected)
        wait_idle(s)
    finally:
        s.stop()


def check_second_router_replica(server, redis_url: str, expected) -> None:
    """A router replica (a router_only Server on the same Redis and Ray) sees the same workers,
    serves through them over its own gRPC and leaves them running when it stops; a Router's
    default SLO applies to requests that set none."""
    import asyncio

    from splitserve.cluster.redis_store import RedisStore
    from splitserve.config import ServeConfig
    from splitserve.engine.model_files import default_model_path, load_tokenizer
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.errors import CapacityError
    from splitserve.protocol import SLO
    from splitserve.router.api import GenerateInput
    from splitserve.router.router import Router
    from splitserve.server import Server

    replica = Server(server.config, ServeConfig(grpc_port=0, grace_s=5.0, router_only=True)).start()
    try:
        assert replica.deployment is None and replica.router.is_ready()
        assert {w.worker_id for w in replica.router.view.workers} == set(server.deployment.handles)
        assert generate_all(replica.address, PROMPTS[:2]) == expected[:2]
    finally:
        replica.stop()
    assert generate_all(server.address, PROMPTS[:1]) == expected[:1]  # the workers outlived the replica

    async def run() -> None:
        store = RedisStore(redis_url, prefix=server.config.store.prefix)
        try:
            strict = Router(store, load_tokenizer(None), default_model_path(), default_slo=SLO(ttft_s=1e-6))
            await strict.refresh(force=True)
            params = SamplingParams(max_tokens=len(expected[0]), temperature=0)
            with pytest.raises(CapacityError, match="TTFT"):
                [d async for d in strict.generate(GenerateInput(params, prompt=PROMPTS[0]))]
        finally:
            store.close()

    asyncio.run(run())


def check_router_replica_process_needs_no_torch(server, redis_url: str, expected) -> None:
    """`splitserve serve --router-only` in its own process serves greedy and seeded requests
    through the workers and never imports torch or the model code (tests/integration/
    router_only_probe.py reports what it imported)."""
    from tests.integration.test_serving import MAX_TOKENS

    port = free_port()
    cmd = [sys.executable, str(Path(__file__).with_name("router_only_probe.py")), str(port), PROMPTS[0],
           str(MAX_TOKENS), "--redis-url", redis_url, "--store-prefix", server.config.store.prefix,
           "--address", ray.get_runtime_context().gcs_address, "--grace", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, proc.stdout + proc.stderr
    result = json.loads(lines[0].removeprefix("PROBE "))
    assert "error" not in result, result["error"]
    assert result["heavy"] == [], "a router replica imported torch or model code"
    assert result["greedy"] == expected[0]
    with GenerationClient(server.address) as client:
        request = make_request(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.8, seed=7)
        assert result["seeded"] == [t for r in client.generate(request) for t in r.token_ids]
    assert proc.returncode == 0, proc.stderr


def test_a_router_replica_needs_the_workers_redis(capsys):
    from splitserve import cli
    from splitserve.config import ClusterConfig, ServeConfig
    from splitserve.server import Server

    with pytest.raises(ValueError, match="needs the Redis its workers use"):
        Server(ClusterConfig(), ServeConfig(router_only=True))
    assert cli.main(["serve", "--router-only"]) == 2
    assert "needs the Redis its workers use (--redis-url" in capsys.readouterr().err


def test_splitserve_serve_command(ray_cluster, expected):
    """The CLI joins the running Ray, serves until SIGTERM, and stops cleanly."""
    port = free_port()
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "splitserve.cli", "serve", "--address", address, "--grpc-port", str(port),
           "--store-prefix", f"cli-{uuid.uuid4().hex[:8]}", "--num-kv-blocks", "256", "--grace", "5",
           "--no-enable-prefix-caching"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        with GenerationClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(timeout_s=600)
        assert generate_all(f"127.0.0.1:{port}", PROMPTS[:4]) == expected[:4]
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "serving" in output and "stopped" in output


def test_speculative_decode_worker_keeps_greedy_output(ray_cluster, expected):
    """Greedy text is the same whatever k the router or the client picks. Which k the router
    picks depends on step times fitted on this machine, so that choice is asserted on injected
    models in tests/unit/test_placement.py; here only what holds on any machine."""
    from dataclasses import replace

    from splitserve.config import SpeculativeConfig
    from tests.integration.test_serving import ENGINE, MAX_TOKENS

    spec = replace(ENGINE, speculative=SpeculativeConfig("ngram", num_speculative_tokens=3))
    s = start_server(decode_engine=spec)
    try:
        with GenerationClient(s.address) as client:
            def run(k):
                return [list(client.generate(make_request(p, max_tokens=MAX_TOKENS, temperature=0,
                                                          num_speculative_tokens=k))) for p in PROMPTS]

            pinned4, pinned0, adaptive = run(4), run(0), run(None)
        for responses in (pinned4, pinned0, adaptive):
            assert [[t for r in rs for t in r.token_ids] for rs in responses] == expected
        assert sum(rs[-1].speculation.draft_tokens for rs in pinned4) > 0
        assert sum(rs[-1].speculation.draft_tokens for rs in pinned0) == 0
        decoded = [rs for rs in adaptive if rs[-1].usage.completion_tokens > 1]  # not ended by the first token
        assert decoded and all(rs[-1].report.k_history for rs in decoded), "the router tracked every one"
        wait_idle(s)
        check_adaptive_k_on_copy_text(s)
        check_a_local_prefill_holds_the_k_it_chose(s)
    finally:
        s.stop()


def check_adaptive_k_on_copy_text(s) -> None:
    """A copy task alone drafts (a new request probes with k >= 1 until its acceptance is
    measured, whatever other requests taught the controller), and 24 of them at once under the
    router's k give the same greedy text as k = 0."""
    from concurrent.futures import ThreadPoolExecutor

    copy = [{"role": "user", "content": "Repeat the following text exactly, word for word.\n\n" + COPY_TEXT}]

    def generate(k: int | None) -> list:
        with GenerationClient(s.address) as client:
            return list(client.generate(make_request(messages=copy, max_tokens=48, temperature=0,
                                                     num_speculative_tokens=k)))

    def tokens(responses: list) -> list[int]:
        return [t for r in responses for t in r.token_ids]

    reference = tokens(generate(0))
    alone = generate(None)
    assert tokens(alone) == reference
    assert alone[-1].speculation.draft_tokens > 0 and max(alone[-1].report.k_history) >= 1
    with ThreadPoolExecutor(24) as pool:
        loaded = list(pool.map(lambda _: generate(None), range(24)))
    assert all(tokens(responses) == reference for responses in loaded)
    wait_idle(s)


def check_a_local_prefill_holds_the_k_it_chose(s) -> None:
    """A local prefill whose placement chose the k of a request decoding at its worker (chunk size
    and k chosen together; the choice itself is asserted on constructed models in
    tests/unit/test_prefill_placement.py) pushes that k to the worker, holds it against the
    controller until the prompt's first token, and both requests' greedy text is unchanged."""
    import threading

    from splitserve.router.prefill_placement import LOCAL, Placement

    copy = [{"role": "user", "content": "Repeat the following text exactly, word for word.\n\n" + COPY_TEXT}]
    router, controller = s.router, s.router.speculation.controller

    def generate(request_id: str, k: int | None, max_tokens: int, started: threading.Event | None = None) -> list:
        with GenerationClient(s.address) as client:
            responses = []
            for response in client.generate(make_request(messages=copy, request_id=request_id, max_tokens=max_tokens,
                                                         temperature=0, ignore_eos=True, num_speculative_tokens=k)):
                responses.append(response)
                if started is not None:
                    started.set()
            return responses

    def tokens(responses: list) -> list[int]:
        return [t for r in responses for t in r.token_ids]

    # The decoding request's 256 tokens take tens of steps; the placed prompt's prefill ~10 of them.
    reference = tokens(generate("reference", 8, 256))
    started, first = threading.Event(), {}
    decoding = threading.Thread(target=lambda: first.setdefault("out", generate("decoding", None, 256, started)))
    decoding.start()
    assert started.wait(120)
    worker = next(w.worker_id for w in router.view.workers if controller.k_of(w.worker_id, "decoding") is not None)
    held_k = {"decoding": 5}
    seen_held = []

    async def place(req, local=True):  # the decision, injected: prefill locally at the worker, 16 tokens a step
        router.view.inflight_tokens[worker] += len(req.prompt_ids)
        return Placement(LOCAL, worker, worker, 1.0, 0.05, 1.0, chunk_tokens=16, draft_ks=tuple(held_k.items()))

    real_place, router.placer.place = router.placer.place, place
    real_release = router.speculation.release

    def release(worker_id: str, request_id: str) -> None:  # the hold lasts until the newcomer's first token
        seen_held.append((controller.is_held(worker_id), controller.k_of(worker_id, "decoding")))
        real_release(worker_id, request_id)

    router.speculation.release = release
    try:
        placed = generate("placed", None, 16)
    finally:
        router.placer.place, router.speculation.release = real_place, real_release
    decoding.join(300)
    assert tokens(placed) == reference[:16] and tokens(first["out"]) == reference
    assert seen_held[0] == (True, 5) and not controller.is_held(worker)
    assert 5 in first["out"][-1].report.k_history  # pushed to the worker while the prefill ran
    wait_idle(s)


COPY_TEXT = (
    "def moving_average(values, window):\n"
    "    averages = []\n"
    "    total = 0.0\n"
    "    for i, value in enumerate(values):\n"
    "        total += value\n"
    "        if i >= window:\n"
    "            total -= values[i - window]\n"
    "        if i >= window - 1:\n"
    "            averages.append(total / window)\n"
    "    return averages\n"
)
