"""Integration fixtures: a real redis-server and a real local Ray, each started once per session.

``store`` (and ``open_store`` for more clients of the same state) is parametrized over every
MetadataStore backend; each test gets its own key prefix, so tests never see each other's state.
Redis and Ray start only when a test asks for them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from splitserve.cluster.store import MetadataStore
from tests.pki import make_pki

BACKENDS = ("memory", "embedded", "redis", "redis-tls-acl")
REDIS_URL_FIXTURE = {"redis": "redis_url", "redis-tls-acl": "redis_tls_url"}
REDIS_USER, REDIS_PASSWORD = "splitserve", "acl-secret-5d1c"  # an ACL user granted only ~test-* (the key prefixes)


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_redis(binary: str, workdir: Path, port: int | None = None, *,
                 pki: dict[str, Path] | None = None) -> tuple[subprocess.Popen, str]:
    """A redis-server on ``port`` (default: a free one), no persistence: (its process, its URL).
    With ``pki`` (tests.pki.make_pki's files) it speaks TLS only, and only to the ACL user
    REDIS_USER, on keys ``test-*``; the URL carries the user and the CA."""
    port = port or free_port()
    log = workdir / "redis.log"
    # No persistence, and anything the server writes stays in the test's temporary folder.
    cmd = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    cmd += ["--dir", str(workdir), "--logfile", str(log)]
    if pki is None:
        cmd += ["--port", str(port)]
        url = f"redis://127.0.0.1:{port}/0"
    else:
        cmd += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(pki["server.pem"]),
                "--tls-key-file", str(pki["server.key"]), "--tls-ca-cert-file", str(pki["ca.pem"]),
                "--tls-auth-clients", "no", "--user", "default", "off",
                "--user", REDIS_USER, "on", f">{REDIS_PASSWORD}", "~test-*", "+@all", "-@dangerous"]
        url = f"rediss://{REDIS_USER}:{REDIS_PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={pki['ca.pem']}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 15
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                client.ping()
                return proc, url
            except redis.ConnectionError:
                time.sleep(0.05)
    finally:
        client.close()
    proc.kill()
    proc.wait()
    output = log.read_text() if log.exists() else "(no log)"
    raise RuntimeError(f"redis-server on port {port} did not start:\n{output}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a redis-server started for this test session (skipped without the binary, unless CI)."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server not found: install the Debian package redis-server (make setup does, as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    proc, url = _start_redis(binary, tmp_path_factory.mktemp("redis"))
    yield url
    _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def redis_tls_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``rediss://`` URL of a TLS-only redis-server with an ACL user, started for this session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found") if os.environ.get("CI") else pytest.skip("redis-server not found")
    workdir = tmp_path_factory.mktemp("redis-tls")
    proc, url = _start_redis(binary, workdir, pki=make_pki(workdir))
    yield url
    _stop(proc)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One small local Ray instance for the session."""
    import ray

    if ray.is_initialized():  # someone else's session-wide Ray: use it, leave it running
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture
def key_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def open_store(
    backend: str, key_prefix: str, request: pytest.FixtureRequest
) -> Iterator[Callable[[], MetadataStore]]:
    """Opens clients of one shared state (same backend, same prefix); closed after the test.

    For "memory" every call returns the same in-process store: it has no second client.
    """
    clients: list[MetadataStore] = []
    if backend == "memory":
        from splitserve.cluster.embedded_store import MemoryStore

        shared = MemoryStore()

        def make() -> MetadataStore:
            return shared
    elif backend == "embedded":
        request.getfixturevalue("ray_cluster")
        from splitserve.cluster.embedded_store import EmbeddedStore

        def make() -> MetadataStore:
            return EmbeddedStore(prefix=key_prefix)
    else:
        url = request.getfixturevalue(REDIS_URL_FIXTURE[backend])
        from splitserve.cluster.redis_store import RedisStore

        def make() -> MetadataStore:
            return RedisStore(url, prefix=key_prefix)

    def opened() -> MetadataStore:
        clients.append(make())
        return clients[-1]

    yield opened
    for client in clients:
        client.close()
    if clients:
        _drop_state(backend, key_prefix, request)


def _drop_state(backend: str, key_prefix: str, request: pytest.FixtureRequest) -> None:
    if backend == "embedded":
        from splitserve.cluster.embedded_store import EmbeddedStore

        EmbeddedStore(prefix=key_prefix).destroy()
    elif backend in REDIS_URL_FIXTURE:
        client = redis.Redis.from_url(request.getfixturevalue(REDIS_URL_FIXTURE[backend]))
        keys = list(client.scan_iter(match=f"{key_prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def store(open_store: Callable[[], MetadataStore]) -> MetadataStore:
    return open_store()
