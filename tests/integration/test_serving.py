"""End to end: real Ray actors, a real store (embedded actor or redis-server), real gRPC.

A Server runs prefill and decode workers (or colocated ones); the gRPC client's greedy output
must equal the offline engine's. Faults (a corrupted chunk, a stalled receiver), cancellation
and bad input are driven against the running workers; after every test the block counts of
every worker are back at idle.
"""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
import ray

from splitserve.config import ClusterConfig, EngineConfig, ServeConfig, StoreConfig, TransferConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.client import GenerationClient, make_request
from splitserve.server import Server
from tests.conftest import PROMPTS

pytestmark = pytest.mark.slow

ENGINE = EngineConfig(num_kv_blocks=256, max_num_batched_tokens=256)
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def expected(llm) -> list[list[int]]:
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    return [o.token_ids for o in outputs]


def generate_all(address: str, prompts=PROMPTS, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    with GenerationClient(address) as client:
        return [
            [t for r in client.generate(make_request(p, max_tokens=max_tokens, temperature=0)) for t in r.token_ids]
            for p in prompts
        ]


def wait_idle(server: Server, timeout_s: float = 60.0) -> None:
    """Every worker's blocks free and no request left (aborts travel asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = server.call(server.deployment.worker_statuses())
        if all(s.is_idle for s in statuses.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"workers not idle: {statuses}")
        time.sleep(0.1)


def start_server(*, transfer: TransferConfig | None = None, redis_url: str | None = None, http: bool = False,
                 serve: dict | None = None, **overrides) -> Server:
    """A Server on the shared Ray with the test engine and a store prefix of its own; gRPC on a free
    port, and OpenAI HTTP too with ``http``; ``serve``: other ServeConfig fields."""
    # A membership TTL no stall of a busy 2-core machine reaches: a lapse would hide a worker.
    store = StoreConfig(redis_url=redis_url, prefix=f"e2e-{uuid.uuid4().hex[:8]}", ttl_s=15.0)
    config = ClusterConfig(engine=ENGINE, transfer=transfer or TransferConfig(), store=store, **overrides)
    return Server(config, ServeConfig(grpc_port=0, http_port=0 if http else None, grace_s=5.0, **(serve or {}))).start()


# A KV chunk's deadline: long enough for any chunk on a slow machine. A drill's stalled chunk
# waits a second longer, so its handoff fails by the deadline whatever the machine's speed, and
# a retry's chunks (queued behind it at the same receiver) still land well within theirs.
DRILL_TIMEOUT_S = 6.0
KV_AUTH_KEY = b"e2e-deployment-secret"
STALL_S = DRILL_TIMEOUT_S + 1.0


@pytest.fixture(scope="module")
def server(ray_cluster):
    """Disaggregated, collective transfer with a KV auth key, embedded store; a short reservation
    lease for the drills."""
    transfer = TransferConfig(timeout_s=DRILL_TIMEOUT_S, reservation_lease_s=4.0, auth_key=KV_AUTH_KEY)
    s = start_server(mode="disaggregated", transfer=transfer)
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _idle_after(request):
    yield
    if "server" in request.fixturenames:
        wait_idle(request.getfixturevalue("server"))


def actor(server: Server, kind: str):
    worker_id = next(w for w in server.deployment.handles if f".{kind}-" in w)
    return server.deployment.handles[worker_id]


# ------------------------------------------------------------------------- equivalence


def test_greedy_output_equals_offline_engine(server, expected):
    assert generate_all(server.address) == expected
    stats = ray.get(actor(server, "prefill").stats.remote())
    assert stats["handoffs"] >= len(PROMPTS) and stats["kv_bytes"] > 0


def test_concurrent_requests_equal_offline_engine(server, expected):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: generate_all(server.address, [p])[0], PROMPTS))
    assert results == expected
    # Disaggregated: a burst never spills to a local prefill.
    placed = {kind: server.metrics.registry.get_sample_value("splitserve_placements_total", {"placement": kind})
              for kind in ("local", "remote")}
    assert placed["local"] == 0 and placed["remote"] >= len(PROMPTS)


def test_workers_publish_their_prefix_caches_to_the_store(server):
    from splitserve.cluster.stores import make_store
    from splitserve.engine.block_pool import hash_block_tokens

    prompt = list(range(500, 560))  # three full blocks of 16
    with GenerationClient(server.address) as client:
        list(client.generate(make_request(prompt_token_ids=prompt, max_tokens=2, temperature=0)))
    hashes, parent = [], None
    for i in range(3):
        parent = hash_block_tokens(parent, prompt[16 * i : 16 * (i + 1)])
        hashes.append(parent)
    prefill_id = next(w for w in server.deployment.handles if ".prefill-" in w)
    store = make_store(server.config.store)
    try:
        deadline = time.monotonic() + 10
        while store.match_prefix(hashes).get(prefill_id) != 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        # Every worker mirrors its cache; the decode worker's holds what it decoded (placement
        # counts its hits for a local prefill there).
        assert store.match_prefix(hashes)[prefill_id] == 3
    finally:
        store.close()


def test_a_decode_worker_takes_a_shared_prefix_from_its_cache_and_receives_only_the_tail(server, llm):
    # The opening sentence is in no other test's prompt, so neither worker caches any of it yet.
    prefix = llm.tokenizer.encode(f"Notes for the prefix reuse drill. {PROMPTS[4]} {PROMPTS[2]} {PROMPTS[5]}")
    prompts = [prefix + llm.tokenizer.encode(PROMPTS[i]) for i in (0, 6)]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    prefill = actor(server, "prefill")
    outputs, kv_bytes, decode_workers = [], [], set()
    with GenerationClient(server.address) as client:
        for prompt in prompts:
            before = ray.get(prefill.stats.remote())["kv_bytes"]
            out = list(client.generate(make_request(prompt_token_ids=prompt, max_tokens=MAX_TOKENS, temperature=0)))
            outputs.append([t for r in out for t in r.token_ids])
            kv_bytes.append(ray.get(prefill.stats.remote())["kv_bytes"] - before)
            decode_workers.add(out[-1].report.decode_worker)
    assert outputs == expected
    assert len(decode_workers) == 1
    # The second prompt's shared whole blocks came from the decode worker's cache: only its tail
    # travelled, at the first prompt's bytes per token.
    start = len(prefix) // ENGINE.block_size * ENGINE.block_size
    assert start >= 48 and kv_bytes[1] < kv_bytes[0]
    assert kv_bytes[1] * len(prompts[0]) == kv_bytes[0] * (len(prompts[1]) - start)


# ------------------------------------------------------------------------------ faults


def test_corrupted_chunk_is_detected_and_resent(server, expected):
    prefill = actor(server, "prefill")
    before = ray.get(prefill.stats.remote())["kv_resends"]
    ray.get(prefill.inject_corruption.remote(2))
    assert generate_all(server.address, PROMPTS[:2]) == expected[:2]
    assert ray.get(prefill.stats.remote())["kv_resends"] >= before + 2


def test_stalled_transfer_times_out_and_the_retry_completes(server, expected):
    # The first chunk waits at the receiver past its deadline, so the first handoff fails, its
    # blocks are freed on both sides, and the router's retry succeeds.
    decode = actor(server, "decode")
    ray.get(decode.inject_stall.remote(STALL_S, 1))
    before = ray.get(actor(server, "prefill").stats.remote())["failed_handoffs"]
    try:
        with GenerationClient(server.address) as client:
            out = list(client.generate(make_request(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)))
    finally:
        ray.get(decode.release_stalls.remote())  # the stalled chunk is refused: its blocks were freed
    assert [t for r in out for t in r.token_ids] == expected[0]
    assert ray.get(actor(server, "prefill").stats.remote())["failed_handoffs"] > before
    assert out[-1].report.handoff_attempts >= 2


def test_transfer_that_keeps_stalling_fails_with_unavailable(server):
    decode = actor(server, "decode")
    ray.get(decode.inject_stall.remote(STALL_S, 3))  # every attempt's first chunk
    try:
        with GenerationClient(server.address) as client, pytest.raises(grpc.RpcError) as info:
            list(client.generate(make_request(PROMPTS[0], max_tokens=4, temperature=0)))
    finally:
        ray.get(decode.release_stalls.remote())
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "handoff failed" in info.value.details()


def test_reservation_never_started_is_released(server):
    decode = actor(server, "decode")
    destination = ray.get(decode.reserve.remote("orphan", list(range(100, 140)), SamplingParams(max_tokens=4)))
    assert len(destination.block_ids) == 3
    statuses = server.call(server.deployment.worker_statuses())
    assert not all(s.is_idle for s in statuses.values())
    wait_idle(server, timeout_s=15)  # nobody renews it: its 4 s lease lapses


def test_a_reservation_lives_while_renewed_and_lapses_when_renewals_stop(server):
    decode = actor(server, "decode")
    destination = ray.get(decode.reserve.remote("leased", list(range(200, 240)), SamplingParams(max_tokens=4)))
    assert destination.lease_s == 4.0
    for _ in range(6):  # 6 s, beyond its 4 s lease: renewed every second, it stays
        time.sleep(1.0)
        assert ray.get(decode.renew_reservation.remote("leased")) is True
    assert not all(s.is_idle for s in server.call(server.deployment.worker_statuses()).values())
    wait_idle(server, timeout_s=15)  # renewals stopped: it lapses
    assert ray.get(decode.renew_reservation.remote("leased")) is False


# ----------------------------------------------------------------- cancel and bad input


def test_cancelling_a_stream_frees_blocks_on_both_workers(server):
    with GenerationClient(server.address) as client:
        stream = client.generate(make_request(PROMPTS[2], max_tokens=400, temperature=0, ignore_eos=True))
        for _, _ in zip(range(3), stream, strict=False):
            pass
        statuses = server.call(server.deployment.worker_statuses())
        decode = next(s for s in statuses.values() if s.kind == "decode")
        assert decode.num_unfinished == 1  # it was decoding when cancelled
        stream.close()
    wait_idle(server)


@pytest.mark.parametrize(
    ("request_args", "message"),
    [
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt_token_ids": [7] * 5000}, "max_model_len"),
        ({"prompt": "hi", "temperature": -1.0}, "temperature"),
        ({"prompt": "hi", "top_p": 0.0}, "top_p"),
        ({"prompt": "hi", "model": "gpt-imaginary"}, "unknown model"),
        ({"prompt_token_ids": [10**7]}, "outside the vocabulary"),
    ],
)
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(server, expected, request_args, message):
    args = dict(request_args)
    prompt = args.pop("prompt", None)
    with GenerationClient(server.address) as client:
        with pytest.raises(grpc.RpcError) as info:
            list(client.generate(make_request(prompt, max_tokens=4, **args)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()
    assert generate_all(server.address, PROMPTS[:1]) == expected[:1]


def test_request_that_cannot_meet_its_slo_is_refused_with_resource_exhausted(server, expected):
    with GenerationClient(server.address) as client:
        with pytest.raises(grpc.RpcError) as info:
            list(client.generate(make_request(PROMPTS[4], max_tokens=4, temperature=0, ttft_ms=1e-4)))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "predicted TTFT" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(client.generate(make_request(PROMPTS[4], max_tokens=4, temperature=0, tpot_ms=1e-4)))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "predicted TPOT" in info.value.details()
    # A reachable SLO is served.
    with GenerationClient(server.address) as client:
        out = list(client.generate(make_request(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                                ttft_ms=60_000, tpot_ms=60_000)))
    assert [t for r in out for t in r.token_ids] == expected[0]


def test_last_message_reports_how_the_request_was_served(server, expected):
    with GenerationClient(server.address) as client:
        out = list(client.generate(make_request(PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0)))
    assert [t for r in out for t in r.token_ids] == expected[2]
    assert all(not r.HasField("report") for r in out[:-1])
    report = out[-1].report
    assert ".prefill-" in report.prefill_worker and ".decode-" in report.decode_worker
    assert report.handoff_attempts == 1
    assert report.placement == "remote" and report.predicted_ttft_s > 0 and report.ttft_s > 0
    assert report.prefill_s > 0 and report.decode_s > 0 and report.queue_s >= 0 and report.transfer_s >= 0
    assert report.prefill_s + report.decode_s < 60
