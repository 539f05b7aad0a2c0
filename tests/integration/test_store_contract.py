"""The MetadataStore contract, run against every backend: in-process memory, the embedded Ray
actor (a real local Ray), Redis (a real redis-server) and Redis over TLS with an ACL user
(``rediss://``). Same test functions for each."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import pytest

from splitserve.cluster.store import MetadataStore, Snapshot, StoreConnectionError, WorkerInfo, WorkerLoad
from splitserve.cluster.stores import make_store
from splitserve.config import StoreConfig
from splitserve.engine.block_pool import hash_block_tokens
from tests.integration.conftest import REDIS_PASSWORD, REDIS_URL_FIXTURE

# Expiry tests set everything up under LONG_TTL, check it, and only then shorten a TTL to
# SHORT_TTL and wait EXPIRY_WAIT: a slow setup cannot expire anything early, and a TTL cannot
# lapse late (the store counts it from the shortening call, which returned before the wait).
SHORT_TTL = 0.3
EXPIRY_WAIT = 0.5
LONG_TTL = 60.0
HEARTBEAT_TTL = 1.5  # far above a heartbeat's round trip, even to a busy Ray actor


def worker(worker_id: str, kind: str = "prefill") -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        kind=kind,  # type: ignore[arg-type]
        rpc_endpoint=f"{worker_id}.local:50051",
        kv_endpoint=f"{worker_id}.local:50052",
        node_id="node-a",
        started_at=1_700_000_000.25,
    )


def load(queued: int = 0, running: int = 0, free: int = 10, total: int = 10) -> WorkerLoad:
    return WorkerLoad(queued, running, free, total, updated_at=1_700_000_001.5)


def chain(num_blocks: int, seed: int = 0, block_size: int = 4) -> list[bytes]:
    """Real chained block hashes, as the engine's block pool computes them."""
    hashes: list[bytes] = []
    for i in range(num_blocks):
        tokens = [seed * 1000 + i * block_size + j for j in range(block_size)]
        hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens))
    return hashes


# Membership


def test_register_and_list_by_kind(store: MetadataStore) -> None:
    infos = [worker("p1", "prefill"), worker("d1", "decode"), worker("c1", "colocated")]
    for info in infos:
        store.register_worker(info, LONG_TTL)
    assert store.list_workers() == sorted(infos, key=lambda i: i.worker_id)
    assert store.list_workers("decode") == [infos[1]]
    assert store.list_workers("prefill") == [infos[0]]


def test_register_again_replaces_info_and_drops_old_state(store: MetadataStore) -> None:
    store.register_worker(worker("w1", "prefill"), LONG_TTL)
    store.put_load("w1", load(queued=5))
    store.add_prefix_blocks("w1", chain(2))
    store.put_model("w1", "step", {"a": 1.0})
    store.register_worker(worker("w1", "decode"), LONG_TTL)  # a restarted process, empty cache
    assert store.list_workers() == [worker("w1", "decode")]
    assert store.get_loads() == {}
    assert store.match_prefix(chain(2)) == {}
    assert store.get_models("step") == {}


def test_deregister_removes_worker_and_its_entries(store: MetadataStore) -> None:
    hashes = chain(3)
    for worker_id in ("w1", "w2"):
        store.register_worker(worker(worker_id), LONG_TTL)
        store.put_load(worker_id, load())
        store.add_prefix_blocks(worker_id, hashes)
        store.put_model(worker_id, "step", {"a": 1.0})
    store.deregister_worker("w1")
    store.deregister_worker("never-registered")  # ignored
    assert [info.worker_id for info in store.list_workers()] == ["w2"]
    assert list(store.get_loads()) == ["w2"]
    assert store.match_prefix(hashes) == {"w2": 3}
    assert list(store.get_models("step")) == ["w2"]
    assert store.heartbeat("w1", LONG_TTL) is False


def test_worker_expires_without_heartbeat(store: MetadataStore) -> None:
    store.register_worker(worker("short"), LONG_TTL)
    store.register_worker(worker("long"), LONG_TTL)
    assert len(store.list_workers()) == 2
    assert store.heartbeat("short", SHORT_TTL) is True  # its last heartbeat
    time.sleep(EXPIRY_WAIT)
    assert [info.worker_id for info in store.list_workers()] == ["long"]
    assert store.heartbeat("short", LONG_TTL) is False  # too late: it must register again
    assert [info.worker_id for info in store.list_workers()] == ["long"]


def test_heartbeat_keeps_worker_alive(store: MetadataStore) -> None:
    ttl_s = HEARTBEAT_TTL
    store.register_worker(worker("w1"), ttl_s)
    start = time.monotonic()
    while time.monotonic() - start < 2 * ttl_s:  # outlive the TTL twice over
        time.sleep(0.15)
        assert store.heartbeat("w1", ttl_s) is True
    assert [info.worker_id for info in store.list_workers()] == ["w1"]
    assert store.heartbeat("unknown", ttl_s) is False


def test_expired_worker_load_prefix_and_models_disappear(store: MetadataStore) -> None:
    hashes = chain(4)
    store.register_worker(worker("short"), LONG_TTL)
    store.register_worker(worker("long"), LONG_TTL)
    for worker_id in ("short", "long"):
        store.put_load(worker_id, load(queued=7))
        store.put_model(worker_id, "step", {"a": 2.0})
    store.add_prefix_blocks("short", hashes)
    store.add_prefix_blocks("long", hashes[:2])
    assert store.match_prefix(hashes) == {"short": 4, "long": 2}
    assert sorted(store.get_loads()) == sorted(store.get_models("step")) == ["long", "short"]
    assert store.heartbeat("short", SHORT_TTL) is True  # its last heartbeat
    time.sleep(EXPIRY_WAIT)
    assert list(store.get_loads()) == ["long"]
    assert store.match_prefix(hashes) == {"long": 2}
    assert list(store.get_models("step")) == ["long"]
    store.list_workers()  # a router's poll also clears the expired worker's leftovers
    store.register_worker(worker("short"), LONG_TTL)  # back, with an empty cache
    assert store.match_prefix(hashes) == {"long": 2}
    assert list(store.get_loads()) == ["long"]


# Load


def test_loads_round_trip_and_replace(store: MetadataStore) -> None:
    store.register_worker(worker("p1"), LONG_TTL)
    store.register_worker(worker("d1", "decode"), LONG_TTL)
    store.register_worker(worker("idle"), LONG_TTL)  # never reports: not in get_loads
    store.put_load("p1", load(queued=100, running=2, free=3, total=8))
    store.put_load("d1", load(running=4))
    store.put_load("d1", load(running=5, free=1))
    assert store.get_loads() == {"p1": load(100, 2, 3, 8), "d1": load(running=5, free=1)}


def test_load_validation() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        WorkerLoad(-1, 0, 0, 0)
    with pytest.raises(ValueError, match="exceeds num_total_blocks"):
        WorkerLoad(0, 0, 9, 8)


# Prefix-block index


def test_match_prefix_counts_leading_hashes_only(store: MetadataStore) -> None:
    hashes = chain(6)
    for worker_id in ("full", "gap", "tail", "other"):
        store.register_worker(worker(worker_id), LONG_TTL)
    store.add_prefix_blocks("full", hashes)
    store.add_prefix_blocks("gap", [hashes[0], hashes[1], hashes[3], hashes[4]])  # lacks block 2
    store.add_prefix_blocks("tail", hashes[1:])  # lacks the first block: no usable prefix
    store.add_prefix_blocks("other", chain(3, seed=1))
    assert store.match_prefix(hashes) == {"full": 6, "gap": 2}
    assert store.match_prefix(hashes[:1]) == {"full": 1, "gap": 1}
    assert store.match_prefix(chain(3, seed=1)) == {"other": 3}
    assert store.match_prefix(chain(3, seed=2)) == {}
    assert store.match_prefix([]) == {}


def test_remove_prefix_blocks(store: MetadataStore) -> None:
    hashes = chain(4)
    store.register_worker(worker("w1"), LONG_TTL)
    store.add_prefix_blocks("w1", hashes)
    store.add_prefix_blocks("w1", hashes)  # idempotent
    store.remove_prefix_blocks("w1", [hashes[2], chain(1, seed=9)[0]])  # an unknown hash is ignored
    assert store.match_prefix(hashes) == {"w1": 2}
    store.remove_prefix_blocks("w1", hashes[:1])
    assert store.match_prefix(hashes) == {}
    store.add_prefix_blocks("w1", hashes[:1])
    assert store.match_prefix(hashes) == {"w1": 2}


# Latency models


def test_models_per_worker_and_name(store: MetadataStore) -> None:
    store.register_worker(worker("d1", "decode"), LONG_TTL)
    store.register_worker(worker("d2", "decode"), LONG_TTL)
    store.put_model("d1", "step_time", {"base": 0.01, "per_token": 2e-5, "per_context": 1e-7})
    store.put_model("d2", "step_time", {"base": 0.02, "per_token": 3e-5})
    store.put_model("d1", "ttft", {"base": 0.1})
    store.put_model("d2", "step_time", {"base": 0.03})  # replaces d2's coefficients
    assert store.get_models("step_time") == {
        "d1": {"base": 0.01, "per_token": 2e-5, "per_context": 1e-7},
        "d2": {"base": 0.03},
    }
    assert store.get_models("ttft") == {"d1": {"base": 0.1}}
    assert store.get_models("unknown") == {}


def test_a_report_beats_and_publishes_at_once_and_a_snapshot_reads_it_all(store: MetadataStore) -> None:
    store.register_worker(worker("d1", "decode"), LONG_TTL)
    store.register_worker(worker("p1"), LONG_TTL)
    assert store.report("d1", LONG_TTL, load(queued=3), {"step": {"a": 1.0}, "limits": {"k": 4.0}}) is True
    assert store.report("p1", LONG_TTL, load(queued=9), {}) is True
    assert store.get_loads() == {"d1": load(queued=3), "p1": load(queued=9)}
    assert store.get_models("step") == {"d1": {"a": 1.0}} and store.get_models("limits") == {"d1": {"k": 4.0}}
    assert store.snapshot(["step", "unknown"]) == Snapshot(
        store.list_workers(), store.get_loads(), {"step": {"d1": {"a": 1.0}}, "unknown": {}})
    # An expired (or unknown) worker's report says so, and nothing it wrote is visible.
    assert store.report("gone", LONG_TTL, load(queued=1), {"step": {"a": 5.0}}) is False
    assert "gone" not in store.get_loads() and "gone" not in store.get_models("step")
    assert store.report("d1", SHORT_TTL, load(queued=3), {}) is True  # its last report
    time.sleep(EXPIRY_WAIT)
    assert store.snapshot(["step"]) == Snapshot([worker("p1")], {"p1": load(queued=9)}, {"step": {}})


# Leases


def test_lease_is_exclusive_and_only_the_owner_releases(store: MetadataStore) -> None:
    assert store.acquire_lease("xfer-1", "prefill-a", LONG_TTL) is True
    assert store.acquire_lease("xfer-1", "prefill-b", LONG_TTL) is False
    assert store.acquire_lease("xfer-1", "prefill-a", LONG_TTL) is False  # not re-entrant
    assert store.acquire_lease("xfer-2", "prefill-b", LONG_TTL) is True  # leases are independent
    assert store.release_lease("xfer-1", "prefill-b") is False
    assert store.renew_lease("xfer-1", "prefill-b", LONG_TTL) is False
    assert store.acquire_lease("xfer-1", "prefill-b", LONG_TTL) is False  # still a's
    assert store.release_lease("xfer-1", "prefill-a") is True
    assert store.release_lease("xfer-1", "prefill-a") is False  # already released
    assert store.acquire_lease("xfer-1", "prefill-b", LONG_TTL) is True


def test_lease_expires_and_renewal_extends_it(store: MetadataStore) -> None:
    assert store.acquire_lease("stalled", "prefill-a", LONG_TTL) is True
    assert store.acquire_lease("renewed", "prefill-a", HEARTBEAT_TTL) is True
    acquired = time.monotonic()  # "renewed" would lapse by acquired + HEARTBEAT_TTL ...
    assert store.renew_lease("renewed", "prefill-a", LONG_TTL) is True  # ... but is extended
    assert store.renew_lease("stalled", "prefill-a", SHORT_TTL) is True  # its last renewal
    time.sleep(max(EXPIRY_WAIT, acquired + HEARTBEAT_TTL - time.monotonic()))
    assert store.acquire_lease("stalled", "prefill-b", LONG_TTL) is True  # the stalled one lapsed
    assert store.release_lease("stalled", "prefill-a") is False  # a stale owner cannot free b's lease
    assert store.renew_lease("stalled", "prefill-a", LONG_TTL) is False
    assert store.acquire_lease("renewed", "prefill-b", LONG_TTL) is False


# Several clients (router replicas)


def test_two_clients_see_the_same_state(backend: str, open_store: Callable[[], MetadataStore]) -> None:
    if backend == "memory":
        pytest.skip("the in-process store has a single client by construction")
    a, b = open_store(), open_store()
    assert a is not b
    a.register_worker(worker("w1"), LONG_TTL)
    b.put_load("w1", load(queued=3))
    b.add_prefix_blocks("w1", chain(2))
    assert [info.worker_id for info in b.list_workers()] == ["w1"]
    assert a.get_loads() == {"w1": load(queued=3)}
    assert a.match_prefix(chain(2)) == {"w1": 2}
    assert a.acquire_lease("xfer", "router-a", LONG_TTL) is True
    assert b.acquire_lease("xfer", "router-b", LONG_TTL) is False
    b.deregister_worker("w1")
    assert a.list_workers() == []


def test_another_process_sees_the_same_state(
    backend: str, key_prefix: str, store: MetadataStore, request: pytest.FixtureRequest
) -> None:
    if backend == "memory":
        pytest.skip("the in-process store is not shared between processes")
    import ray

    request.getfixturevalue("ray_cluster")
    url = request.getfixturevalue(REDIS_URL_FIXTURE[backend]) if backend in REDIS_URL_FIXTURE else None
    store.register_worker(worker("w1", "decode"), LONG_TTL)
    store.acquire_lease("xfer", "here", LONG_TTL)

    def replica() -> tuple[list[WorkerInfo], bool]:  # nested: Ray pickles it by value
        other = make_store(StoreConfig(redis_url=url, prefix=key_prefix))
        try:
            return other.list_workers(), other.acquire_lease("xfer", "there", LONG_TTL)
        finally:
            other.close()

    infos, got_lease = ray.get(ray.remote(num_cpus=0)(replica).remote(), timeout=60)
    assert infos == [worker("w1", "decode")]
    assert got_lease is False


# Bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.register_worker(worker("w"), 0), "ttl_s"),
        (lambda s: s.register_worker(worker("w"), math.inf), "ttl_s"),
        (lambda s: s.heartbeat("w", -1.0), "ttl_s"),
        (lambda s: s.list_workers("router"), "worker kind"),  # type: ignore[arg-type]
        (lambda s: s.add_prefix_blocks("w", b"\x00" * 16), "sequence of hashes"),
        (lambda s: s.add_prefix_blocks("w", ["00ff"]), "non-empty bytes"),
        (lambda s: s.match_prefix([b""]), "non-empty bytes"),
        (lambda s: s.put_model("w", "step", {"a": math.nan}), "finite"),
        (lambda s: s.put_model("w", "", {"a": 1.0}), "model name"),
        (lambda s: s.report("w", 0, load(), {}), "ttl_s"),
        (lambda s: s.report("w", 1.0, load(), {"step": {"a": math.inf}}), "finite"),
        (lambda s: s.snapshot([""]), "model name"),
        (lambda s: s.acquire_lease("", "me", 1.0), "lease_id"),
        (lambda s: s.acquire_lease("x", "me", 0.0), "ttl_s"),
    ],
)
def test_bad_input_is_rejected_and_changes_nothing(
    store: MetadataStore, call: Callable[[MetadataStore], object], message: str
) -> None:
    store.register_worker(worker("w"), LONG_TTL)
    with pytest.raises(ValueError, match=message):
        call(store)
    assert store.list_workers() == [worker("w")]
    assert store.acquire_lease("x", "me", LONG_TTL) is True


def test_worker_info_validation() -> None:
    with pytest.raises(ValueError, match="worker kind"):
        worker("w", "router")
    with pytest.raises(ValueError, match="worker_id"):
        worker("")


@pytest.mark.parametrize(
    "url",
    ["", "localhost:6379", "http://localhost:6379", "redis://localhost:notaport/0", "redis://:6379/0", "unix://"],
)
def test_malformed_redis_url(url: str) -> None:
    from splitserve.cluster.redis_store import RedisStore

    with pytest.raises(ValueError, match="Redis URL"):
        RedisStore(url)
    with pytest.raises(ValueError, match="Redis URL|redis_url"):
        make_store(StoreConfig(redis_url=url))


def test_unreachable_redis_names_the_url_without_password(unused_port: int) -> None:
    from splitserve.cluster.redis_store import RedisStore

    url = f"redis://:hunter2@127.0.0.1:{unused_port}/0"
    with pytest.raises(StoreConnectionError, match=r"127\.0\.0\.1") as info:
        RedisStore(url, connect_timeout_s=1.0)
    assert "hunter2" not in str(info.value)


def test_redis_over_tls_refuses_plaintext_wrong_credentials_and_keys_outside_the_acl(redis_tls_url: str) -> None:
    from splitserve.cluster.redis_store import RedisStore

    parts = urlsplit(redis_tls_url)
    plaintext = urlunsplit(parts._replace(scheme="redis", query=""))
    with pytest.raises(StoreConnectionError, match="cannot reach Redis"):
        RedisStore(plaintext, connect_timeout_s=1.0, timeout_s=1.0)
    wrong = redis_tls_url.replace(f":{REDIS_PASSWORD}@", ":not-the-password@")
    with pytest.raises(StoreConnectionError, match="cannot reach Redis") as info:
        RedisStore(wrong)
    assert "not-the-password" not in str(info.value)
    with pytest.raises(StoreConnectionError, match=r"refuses this user the keys under 'elsewhere'.*~elsewhere:\*"):
        RedisStore(redis_tls_url, prefix="elsewhere")  # the ACL grants ~test-* only
    untrusted = urlunsplit(parts._replace(query=""))  # no CA: the server's certificate is not trusted
    with pytest.raises(StoreConnectionError, match="cannot reach Redis"):
        RedisStore(untrusted)


def test_make_store_picks_the_backend(redis_url: str, ray_cluster: None, key_prefix: str) -> None:
    from splitserve.cluster.embedded_store import EmbeddedStore
    from splitserve.cluster.redis_store import RedisStore

    with make_store(StoreConfig(redis_url=redis_url, prefix=key_prefix)) as remote:
        assert isinstance(remote, RedisStore)
    with make_store(StoreConfig(prefix=key_prefix)) as embedded:
        assert isinstance(embedded, EmbeddedStore)
        embedded.register_worker(worker("w1"), LONG_TTL)
        assert EmbeddedStore(prefix=key_prefix).list_workers() == [worker("w1")]
        assert EmbeddedStore(prefix=f"{key_prefix}-other").list_workers() == []  # prefixes are apart
        embedded.destroy()
        assert embedded.list_workers() == []


def test_a_frozen_redis_fails_calls_after_the_timeout_instead_of_hanging(tmp_path) -> None:
    """A redis-server stopped with SIGSTOP (a stall: the socket stays open, nothing answers): a
    heartbeat raises StoreConnectionError (from redis-py's TimeoutError) after
    StoreConfig.timeout_s rather than waiting for the server, so a stalled call cannot outlast
    the membership it renews; after SIGCONT the same client works again."""
    import os
    import shutil
    import signal
    import threading

    import redis

    from tests.integration.conftest import _start_redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found")
    proc, url = _start_redis(binary, tmp_path)
    try:
        store = make_store(StoreConfig(redis_url=url, prefix="frozen", timeout_s=0.5))
        store.register_worker(worker("w1"), LONG_TTL)
        os.kill(proc.pid, signal.SIGSTOP)
        outcome: list[BaseException | bool] = []
        beat = threading.Thread(target=lambda: outcome.append(_raised(store.heartbeat, "w1", LONG_TTL)), daemon=True)
        beat.start()
        beat.join(60)  # without a socket timeout it would wait for SIGCONT
        os.kill(proc.pid, signal.SIGCONT)
        assert outcome and isinstance(outcome[0], StoreConnectionError), outcome
        assert isinstance(outcome[0].__cause__, redis.TimeoutError) and "did not answer" in str(outcome[0])
        assert store.heartbeat("w1", LONG_TTL) is True
        store.close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(10)


def _raised(fn: Callable, *args: object) -> BaseException | bool:
    try:
        return fn(*args)
    except BaseException as e:  # the test inspects it
        return e


def test_every_call_to_a_stopped_redis_raises_store_connection_error(tmp_path) -> None:
    """A stopped server: each contract method fails with StoreConnectionError (a ServingError,
    so a request that needed it fails UNAVAILABLE), never redis-py's own exceptions."""
    import shutil

    from splitserve.errors import ServingError
    from tests.integration.conftest import _start_redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found")
    proc, url = _start_redis(binary, tmp_path)
    store = make_store(StoreConfig(redis_url=url, prefix="stopped"))
    proc.terminate()
    proc.wait(10)
    calls = [lambda: store.register_worker(worker("w1"), LONG_TTL), lambda: store.heartbeat("w1", LONG_TTL),
             lambda: store.list_workers(), lambda: store.match_prefix([b"\x00" * 16]),
             lambda: store.snapshot(["m"]), lambda: store.acquire_lease("l", "me", LONG_TTL),
             lambda: store.report("w1", LONG_TTL, WorkerLoad(0, 0, 1, 1), {})]
    for call in calls:
        with pytest.raises(StoreConnectionError, match="did not answer") as error:
            call()
        assert isinstance(error.value, ServingError)
    store.close()
