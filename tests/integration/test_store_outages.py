"""Redis outages under a serving deployment (a redis-server of the test's own): stopped with
SHUTDOWN NOSAVE and restarted empty, frozen with SIGSTOP, and every client's connection killed
(CLIENT KILL). Once the router's next read of
the store fails (it reads every second), health is NOT_SERVING and new requests fail at once
with UNAVAILABLE; a request already streaming
finishes whole; when the store is back the workers register again and serving resumes, with
nothing left behind. A killed connection is one failed call at most: the next reconnects, and
serving goes on with the same workers listed once."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from urllib.parse import urlsplit

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2

from splitserve.cluster.redis_store import RedisStore
from splitserve.router.client import GENERATION_SERVICE, GenerationClient, make_request
from tests.conftest import PROMPTS
from tests.integration.conftest import _start_redis
from tests.integration.idle import Footprint, assert_idle
from tests.integration.test_serving import start_server

pytestmark = pytest.mark.slow

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _tokens(client: GenerationClient, prompt: str, max_tokens: int) -> list[int]:
    request = make_request(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [t for r in client.generate(request, timeout_s=300) for t in r.token_ids]


def _wait_health(client: GenerationClient, status: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.health(GENERATION_SERVICE) != status:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        assert time.monotonic() < deadline, f"health never became {name}"
        time.sleep(0.2)


def _unavailable(client: GenerationClient) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        _tokens(client, PROMPTS[1], 4)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value.details()
    return error.value


def _stream(client: GenerationClient, tokens: list[int]) -> threading.Thread:
    """A 96-token stream in a thread of its own, returned once it has its first token."""
    started = threading.Event()

    def stream() -> None:
        request = make_request(PROMPTS[0], max_tokens=96, temperature=0, ignore_eos=True)
        for response in client.generate(request, timeout_s=300):
            tokens.extend(response.token_ids)
            started.set()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    assert started.wait(120)
    return thread


def test_serving_through_a_redis_restart_a_freeze_and_killed_connections(ray_cluster, tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found")
    proc, url = _start_redis(binary, tmp_path)
    s = start_server(redis_url=url)
    try:
        with GenerationClient(s.address) as client:
            baseline = _tokens(client, PROMPTS[1], 4)
            footprint = Footprint.of(s)
            long: list[int] = []
            streaming = _stream(client, long)

            try:  # stopped, its data gone
                redis.Redis.from_url(url).shutdown(nosave=True)
            except redis.ConnectionError:
                pass
            proc.wait(30)
            _wait_health(client, NOT_SERVING)  # from the router's next read of the store (every second)
            assert "store cannot be read" in _unavailable(client).details()
            streaming.join(300)
            assert len(long) == 96  # the request already streaming finished whole

            proc, _ = _start_redis(binary, tmp_path, port=urlsplit(url).port)  # back, empty
            _wait_health(client, SERVING)  # the workers registered again
            assert _tokens(client, PROMPTS[1], 4) == baseline

            os.kill(proc.pid, signal.SIGSTOP)  # frozen: calls time out instead of hanging
            try:
                _wait_health(client, NOT_SERVING)
                _unavailable(client)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            _wait_health(client, SERVING)
            assert _tokens(client, PROMPTS[1], 4) == baseline

            long.clear()
            streaming = _stream(client, long)
            killed = redis.Redis.from_url(url).client_kill_filter(_type="normal", skipme=True)
            assert killed >= 3  # the router's and each worker's
            streaming.join(300)
            assert len(long) == 96
            _wait_health(client, SERVING)
            assert _tokens(client, PROMPTS[1], 4) == baseline
            store = RedisStore(url, prefix=s.config.store.prefix)
            try:
                listed = [info.worker_id for info in store.list_workers()]
            finally:
                store.close()
            assert sorted(listed) == sorted(s.deployment.handles)  # each once, none lost
        assert_idle(s, baseline=footprint)  # Redis' connections too: one per caller, not one per failure
    finally:
        s.stop()
        proc.terminate()
        proc.wait(10)
