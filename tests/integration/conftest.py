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

BACKENDS = ("memory", "embedded", "redis")


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_redis(binary: str, workdir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A redis-server on ``port`` (default: a free one), no persistence: (its process, its URL)."""
    port = port or free_port()
    log = workdir / "redis.log"
    # No persistence, and anything the server writes stays in the test's temporary folder.
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    cmd += ["--dir", str(workdir), "--logfile", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
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
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
        url = request.getfixturevalue("redis_url")
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
    elif backend == "redis":
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        keys = list(client.scan_iter(match=f"{key_prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def store(open_store: Callable[[], MetadataStore]) -> MetadataStore:
    return open_store()
