"""Faults on a real Ray cluster with the real model.

A worker killed (SIGKILL, SIGTERM or ray.kill) while it streams requests: every stream continues on
another worker from the tokens its client got (migration; after SIGTERM a stream may also end
where it was, as Ray lets an actor's running tasks finish), greedy and seeded outputs equal to
an uninterrupted run, the RequestReport and /metrics count the moves, the router stops sending
new requests to the dead worker at once (its membership has a 15 s TTL here): in elastic mode
the other worker serves them, in disaggregated mode they fail at once with UNAVAILABLE (no
decode worker is left); and the live workers end idle.

A router replica (`splitserve serve --router-only`, its own process) killed with SIGKILL while
it streams: its clients see the stream end with an error, not a hang; the workers abort its
requests once its stream lease lapses; the other router's stream goes on untouched. A prefill
worker killed mid-transfer: its decode reservation is released at once and another prefill
worker serves the request. A worker whose process died is replaced (same name) and served
from again. A stream whose end is lost (the worker's outputs stop reaching it) continues on the
other worker, whole, once the router's check finds the request gone from its worker. Half of 40
streams cancelled by their clients (gRPC cancels, HTTP clients hanging up): exactly those are
aborted, where they ran, and counted once.
Each test runs its own Server (its own module: they cannot share the CPUs with others)."""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import ray

from splitserve import SamplingParams
from splitserve.config import TransferConfig
from splitserve.router.client import GenerationClient, make_request
from tests.conftest import PROMPTS
from tests.integration.conftest import free_port
from tests.integration.idle import Footprint, assert_idle
from tests.integration.test_serving import start_server

pytestmark = pytest.mark.slow

MAX_TOKENS = 64  # long enough that every stream is mid-way when its worker is killed
STREAMS = [(PROMPTS[i], None) for i in range(4)] + [(PROMPTS[4], 7), (PROMPTS[5], 8)]  # (prompt, seed)


def _params(seed: int | None) -> dict:
    return {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0.0 if seed is None else 0.8, "seed": seed}


@pytest.fixture(scope="module")
def uninterrupted(llm) -> list[list[int]]:
    return [llm.generate(prompt, SamplingParams(**_params(seed)))[0].token_ids for prompt, seed in STREAMS]


class _Stream(threading.Thread):
    """One gRPC stream, read to its end: its tokens, its last response, or its error."""

    def __init__(self, address: str, prompt: str, seed: int | None, **params):
        super().__init__(daemon=True)
        self.address, self.request = address, make_request(prompt, **(_params(seed) | params))
        self.tokens: list[int] = []
        self.last = self.error = None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            with GenerationClient(self.address) as client:
                for response in client.generate(self.request, timeout_s=600):
                    self.tokens += response.token_ids
                    self.last = response
                    if len(self.tokens) >= 2:
                        self.started.set()
        except Exception as e:  # the test reports it
            self.error = e
        finally:
            self.started.set()


def _kill(handle, how: str) -> None:
    if how == "ray.kill":
        ray.kill(handle, no_restart=True)
    else:
        pid = ray.get(handle.__ray_call__.remote(lambda actor: os.getpid()), timeout=60)
        os.kill(pid, signal.SIGKILL if how == "sigkill" else signal.SIGTERM)


@pytest.mark.parametrize(("mode", "how"), [("elastic", "sigkill"), ("elastic", "sigterm"),
                                           ("disaggregated", "ray.kill")])
def test_streams_continue_on_another_worker_when_theirs_dies(ray_cluster, uninterrupted, mode, how):
    s = start_server(mode=mode, restart_workers=False)  # the victim stays dead: no request may reach it
    try:
        streams = [_Stream(s.address, prompt, seed) for prompt, seed in STREAMS]
        for stream in streams:
            stream.start()
        for stream in streams:
            assert stream.started.wait(300), "a stream produced no tokens"
        # The worker decoding most of them (disaggregated: the decode worker, which decodes all).
        statuses = s.call(s.deployment.worker_statuses())
        victim = max(statuses, key=lambda w: (statuses[w].kind == "decode", statuses[w].num_unfinished))
        _kill(s.deployment.handles[victim], how)

        after = [_Stream(s.address, prompt, None) for prompt, _ in STREAMS[:2]]  # new requests at once
        for stream in after:
            stream.run()
        for stream in streams:
            stream.join(600)
        assert [stream.error for stream in streams] == [None] * len(streams)
        assert [stream.tokens for stream in streams] == uninterrupted
        failed = 0
        if mode == "disaggregated":  # its one decode worker is gone: new requests fail at once, clearly
            assert all(s.code() == grpc.StatusCode.UNAVAILABLE and "no live decode worker" in s.details()
                       for s in (stream.error for stream in after))
            failed, after = len(after), []
        assert [stream.error for stream in after] == [None] * len(after)  # elastic: the other worker serves them
        assert [stream.tokens for stream in after] == uninterrupted[: len(after)]
        reports = [stream.last.report for stream in streams + after]
        if how != "sigterm":  # SIGTERM: Ray's worker exits once its running tasks end: a stream may finish there
            assert all(r.decode_worker != victim for r in reports)
            assert sum(r.migrations for r in reports[: len(streams)]) >= 1, f"no stream was on {victim} when it died"
        moved = sum(r.migrations for r in reports)  # a new request placed there before anyone noticed moves too
        counted = next(float(line.split()[1]) for line in s.metrics.render().decode().splitlines()
                       if line.startswith("splitserve_migrations_total "))
        # A new request that moved and then found no decode worker left counts but has no report.
        assert moved <= counted <= moved + 3 * failed  # (3: the migration limit)

        assert_idle(s, dead=frozenset({victim}))
    finally:
        s.stop()


def test_a_stream_its_worker_gives_up_continues_elsewhere_whole(ray_cluster, llm):
    """A worker that ends a request unasked (stopping, or it lost the router's lease) says
    "abort"; the request moves on like one whose worker died, never ending short of its tokens."""
    s = start_server(mode="elastic")
    try:
        stream = _Stream(s.address, PROMPTS[4], None)
        stream.start()
        assert stream.started.wait(300), "the stream produced no tokens"
        (worker_id, request_id), = _streaming(s)
        ray.get(s.deployment.handles[worker_id].abort.remote(request_id), timeout=60)
        stream.join(600)
        assert stream.error is None and stream.tokens == uninterrupted_tokens(llm, PROMPTS[4])
        assert stream.last.report.migrations == 1 and stream.last.report.decode_worker != worker_id
        assert_idle(s)
    finally:
        s.stop()


def test_a_stream_whose_end_is_lost_continues_elsewhere_whole(ray_cluster, llm):
    """The worker finishes the request but its stream never says so (its outputs stop reaching
    the stream: what chaos soak run 5's three hung streams looked like). The router asks the
    silent stream's worker, which no longer holds the request, and moves the request on."""
    s = start_server(mode="elastic", serve={"stream_check_s": 1.0})
    try:
        stream = _Stream(s.address, PROMPTS[4], None)
        stream.start()
        assert stream.started.wait(300), "the stream produced no tokens"

        def lose_outputs(actor, request_id: str) -> None:
            loop, deliver = actor.worker.loop, actor.worker.loop._deliver
            loop._deliver = lambda output: None if output.request_id == request_id else deliver(output)

        (worker_id, request_id), = _streaming(s)
        ray.get(s.deployment.handles[worker_id].__ray_call__.remote(lose_outputs, request_id), timeout=60)
        stream.join(600)
        assert stream.error is None and stream.tokens == uninterrupted_tokens(llm, PROMPTS[4])
        assert stream.last.report.migrations == 1 and stream.last.report.decode_worker != worker_id
        metrics = s.metrics.render().decode().splitlines()
        assert "splitserve_lost_streams_total 1.0" in metrics and "splitserve_migrations_total 1.0" in metrics
        assert_idle(s)
    finally:
        s.stop()


def _streaming(s) -> list[tuple[str, str]]:
    """(worker, request id) of every request a worker of ``s`` streams now."""
    ids = ray.get([h.__ray_call__.remote(lambda actor: list(actor.worker.loop._streams))
                   for h in s.deployment.handles.values()], timeout=60)
    return [(worker_id, request_id) for worker_id, held in zip(s.deployment.handles, ids, strict=True)
            for request_id in held]


def test_a_killed_router_replica_leaves_no_request_decoding(ray_cluster, redis_url, llm):
    s = start_server(mode="elastic", redis_url=redis_url)
    port, lease_s = free_port(), 2.0
    replica = subprocess.Popen(
        [sys.executable, "-m", "splitserve.cli", "serve", "--router-only", "--grpc-port", str(port), "--redis-url",
         redis_url, "--store-prefix", s.config.store.prefix, "--address", ray.get_runtime_context().gcs_address,
         "--stream-lease", str(lease_s)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with GenerationClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(600)
        # Warm-up through the replica at the orphans' concurrency: each worker's channels back to a new
        # caller (Ray's, per process, not per request) open now, not inside the measured window.
        warm = [_Stream(f"127.0.0.1:{port}", PROMPTS[i], None, max_tokens=4) for i in range(4)]
        for stream in warm:
            stream.start()
        for stream in warm:
            stream.join(600)
        assert [stream.error for stream in warm] == [None] * len(warm)
        assert_idle(s)
        baseline = Footprint.of(s)
        long = {"max_tokens": 400}  # far longer than the test: only the lease can end them early
        orphans = [_Stream(f"127.0.0.1:{port}", PROMPTS[i], None, **long) for i in range(4)]
        kept = _Stream(s.address, PROMPTS[4], None)  # the other router's, running through the kill
        for stream in [*orphans, kept]:
            stream.start()
        for stream in [*orphans, kept]:
            assert stream.started.wait(300), "a stream produced no tokens"
        replica.kill()
        replica.wait(60)
        for stream in orphans:
            stream.join(60)
            assert not stream.is_alive(), "a client of the killed router hangs"
            assert isinstance(stream.error, grpc.RpcError) and len(stream.tokens) < long["max_tokens"]
        kept.join(600)
        assert kept.error is None and kept.tokens == uninterrupted_tokens(llm, PROMPTS[4])

        assert_idle(s, baseline=baseline, timeout_s=60)  # the orphans were aborted, not decoded to their end
        aborted = sum(stats["orphans_aborted"] for stats in ray.get(
            [h.stats.remote() for h in s.deployment.handles.values()], timeout=60))
        assert aborted == len(orphans)
    finally:
        if replica.poll() is None:
            replica.kill()
            replica.wait(60)
        s.stop()


def test_a_prefill_worker_killed_mid_transfer_frees_its_reservation_and_the_retry_completes(ray_cluster, llm):
    """Its first KV chunk held at the decode worker (a drill), the prefill worker is SIGKILLed:
    the router releases the decode reservation at once -- the lease and the transfer deadline
    are 10 minutes here, so nothing else could -- and the other prefill worker serves the
    request, greedy output unchanged."""
    transfer = TransferConfig(timeout_s=600.0, reservation_lease_s=600.0)
    s = start_server(mode="disaggregated", num_workers=3, num_prefill_workers=2, num_decode_workers=1,
                     cpus_per_worker=0.5, transfer=transfer, restart_workers=False)
    try:
        statuses = s.call(s.deployment.worker_statuses())
        (decode_id,) = [w for w, status in statuses.items() if status.kind == "decode"]
        decode = s.deployment.handles[decode_id]
        ray.get(decode.inject_stall.remote(math.inf, 1), timeout=60)
        aborted_before = ray.get(decode.stats.remote(), timeout=60)["aborted"]
        stream = _Stream(s.address, PROMPTS[0], None, max_tokens=8)
        stream.start()
        victim = _wait_for(lambda: next((w for w, status in s.call(s.deployment.worker_statuses()).items()
                                         if status.kind == "prefill" and not status.is_idle), None))
        _kill(s.deployment.handles[victim], "sigkill")
        _wait_for(lambda: ray.get(decode.stats.remote(), timeout=60)["aborted"] == aborted_before + 1)
        ray.get(decode.release_stalls.remote(), timeout=60)  # the retry's chunks queue behind the held one
        stream.join(300)
        assert stream.error is None and stream.tokens == uninterrupted_tokens(llm, PROMPTS[0])[:8]
        report = stream.last.report
        assert report.handoff_attempts == 2 and report.prefill_worker not in ("", victim), report
        assert_idle(s, dead=frozenset({victim}))
    finally:
        s.stop()


def test_a_worker_whose_process_died_is_replaced_and_routed_to_again(ray_cluster, llm):
    s = start_server(mode="elastic")
    try:
        victim = sorted(s.deployment.handles)[0]
        old_pid = ray.get(s.deployment.handles[victim].__ray_call__.remote(lambda actor: os.getpid()), timeout=60)
        _kill(s.deployment.handles[victim], "sigkill")
        _wait_for(lambda: s.deployment.num_restarts == 1, timeout_s=300)
        new_pid, arenas = ray.get(s.deployment.handles[victim].__ray_call__.remote(
            lambda actor: (os.getpid(), os.environ.get("MALLOC_ARENA_MAX"))), timeout=60)
        assert new_pid != old_pid
        assert arenas == os.environ.get("MALLOC_ARENA_MAX", "1")  # a replacement starts as the first did
        _wait_for(lambda: victim in {w.worker_id for w in s.call(_refreshed(s.router)).workers})
        streams = [_Stream(s.address, PROMPTS[i], None, max_tokens=8) for i in range(4)]
        for stream in streams:
            stream.start()
        for stream in streams:
            stream.join(300)
        assert [stream.tokens for stream in streams] == [uninterrupted_tokens(llm, PROMPTS[i])[:8] for i in range(4)]
        assert_idle(s)
    finally:
        s.stop()


async def _refreshed(router):
    await router.refresh(force=True)
    return router.view


def _wait_for(condition, timeout_s: float = 120.0):
    """``condition()``'s first truthy value, polled; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "the condition did not come true"
        time.sleep(0.05)
    return value


def uninterrupted_tokens(llm, prompt: str) -> list[int]:
    return llm.generate(prompt, SamplingParams(**_params(None)))[0].token_ids


def test_cancelling_half_of_40_streams_aborts_exactly_those_and_the_rest_finish_whole(ray_cluster):
    s = start_server(mode="elastic", http=True)
    try:
        def counters() -> tuple[dict[str, float], int]:
            outcomes = {line.split('"')[1]: float(line.split()[1]) for line in s.metrics.render().decode().splitlines()
                        if line.startswith("splitserve_requests_total{")}
            stats = ray.get([h.stats.remote() for h in s.deployment.handles.values()], timeout=60)
            return outcomes, sum(w["aborted"] for w in stats)

        def run(n: int) -> tuple[list[_Stream], list[threading.Thread]]:
            kept = [_Stream(s.address, PROMPTS[i % len(PROMPTS)], None, max_tokens=16) for i in range(n)]
            cancelled = [_Cancelled(s.address, PROMPTS[i % len(PROMPTS)]) for i in range(n // 2)] + \
                [_HungUp(s.http_port, PROMPTS[i % len(PROMPTS)]) for i in range(n // 2)]
            streams = [stream for pair in zip(kept, cancelled, strict=True) for stream in pair]
            for stream in streams:
                stream.start()
            for stream in streams:
                stream.join(600)
            return kept, cancelled

        run(20)  # warm-up at the same concurrency: pools that grow on demand (threads) have grown
        assert_idle(s)
        baseline = Footprint.of(s)
        before, aborted_before = counters()
        kept, cancelled = run(20)
        streams = kept + cancelled
        assert [stream.error for stream in streams] == [None] * len(streams)
        assert [len(stream.tokens) for stream in kept] == [16] * len(kept)
        assert all(2 <= len(stream.tokens) < _Cancelled.MAX_TOKENS for stream in cancelled[:10])
        assert all(stream.events == 2 for stream in cancelled[10:])

        assert_idle(s, baseline=baseline)
        after, aborted_after = counters()
        assert after["aborted"] - before["aborted"] == len(cancelled)  # the frontend's count
        assert after["finished"] - before["finished"] == len(kept)
        assert aborted_after - aborted_before == len(cancelled)  # the workers': each stopped once, where it ran
    finally:
        s.stop()


class _Cancelled(_Stream):
    """A long stream its client cancels after two tokens."""

    MAX_TOKENS = 100

    def __init__(self, address: str, prompt: str):
        super().__init__(address, prompt, None, max_tokens=self.MAX_TOKENS)

    def run(self) -> None:
        try:
            with GenerationClient(self.address) as client:
                responses = client.generate(self.request, timeout_s=600)
                for response in responses:
                    self.tokens += response.token_ids
                    if len(self.tokens) >= 2:
                        responses.close()  # cancels the call
                        break
        except Exception as e:  # the test reports it
            self.error = e
        finally:
            self.started.set()


class _HungUp(threading.Thread):
    """A long streamed completion over HTTP whose client closes the connection after two events."""

    def __init__(self, http_port: int, prompt: str):
        super().__init__(daemon=True)
        self.http_port, self.prompt = http_port, prompt
        self.events = 0
        self.error: Exception | None = None

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=600)
        response = None
        try:
            body = {"prompt": self.prompt, "max_tokens": _Cancelled.MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200, response.read()[:500]
            while self.events < 2:
                line = response.readline()
                assert line, "the stream ended before the client hung up"
                self.events += line.startswith(b"data: {")
        except Exception as e:  # the test reports it
            self.error = e
        finally:  # hangs up mid-stream (the socket closes with its last user)
            if response is not None:
                response.close()
            connection.close()
