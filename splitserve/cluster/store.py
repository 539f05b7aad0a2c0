"""MetadataStore: the cluster's shared state, and the factory that picks a backend.

The store holds what every router replica and worker must agree on: which workers are alive
(membership kept by TTL heartbeats), how loaded each one is, which prefix blocks each one has
cached, the latency-model coefficients fitted per worker, and leases that reserve a KV
transfer. Workers write their own entries; routers read everyone's. Two backends hold the
same contract: ``RedisStore`` (a real Redis server; needed for several router replicas on
several machines) and ``EmbeddedStore`` (a named Ray actor; the single-machine default);
``cluster.stores.make_store`` picks one.

Liveness rule shared by every backend: a worker's load, prefix blocks and models are visible
only while its membership is live. ``register_worker`` starts a fresh membership, dropping
anything stored earlier under that id, so a worker whose heartbeat returned False registers
again and then republishes its load, prefix blocks and models.

Every call of every backend raises StoreConnectionError (a ServingError) when the store cannot
be reached or does not answer within the backend's timeout.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from splitserve.config import WORKER_KINDS, check_name
from splitserve.errors import ServingError

WorkerKind = Literal["prefill", "decode", "colocated"]  # config.WORKER_KINDS, as a type


class StoreConnectionError(ConnectionError, ServingError):
    """The store's server (Redis) or actor (Ray) cannot be reached or did not answer in time.
    A ServingError: a request that needed the store fails UNAVAILABLE / 503."""


@dataclass(frozen=True)
class WorkerInfo:
    """How to reach one worker. ``started_at`` is wall-clock seconds (``time.time()``)."""

    worker_id: str
    kind: WorkerKind
    rpc_endpoint: str
    kv_endpoint: str
    node_id: str
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        check_name("worker_id", self.worker_id)
        check_kind(self.kind)


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's load as it last reported it; ``updated_at`` is wall-clock seconds."""

    num_queued_prompt_tokens: int
    num_running_requests: int
    num_free_blocks: int
    num_total_blocks: int
    updated_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        counts = (self.num_queued_prompt_tokens, self.num_running_requests, self.num_free_blocks, self.num_total_blocks)
        if any(n < 0 for n in counts):
            raise ValueError(f"load counts must be non-negative, got {self}")
        if self.num_free_blocks > self.num_total_blocks:
            raise ValueError(
                f"num_free_blocks ({self.num_free_blocks}) exceeds num_total_blocks ({self.num_total_blocks})"
            )


@dataclass(frozen=True)
class Snapshot:
    """What a router reads of the cluster at once: live workers (sorted by id), their loads,
    and for each model name asked for, the coefficients per worker."""

    workers: list[WorkerInfo]
    loads: dict[str, WorkerLoad]
    models: dict[str, dict[str, dict[str, float]]]


class MetadataStore(abc.ABC):
    """The shared-state contract. Every method is safe to call from several clients at once.

    TTLs are seconds (float, > 0). Block hashes are the chained digests of
    ``engine.block_pool.hash_block_tokens``. Methods never raise for an unknown worker id:
    reads leave it out, ``heartbeat`` returns False, writes for it are never visible.
    """

    # Membership
    @abc.abstractmethod
    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        """Start (or restart) a worker's membership, live for ``ttl_s`` unless heart-beaten.

        Replaces anything stored under ``info.worker_id`` before: info, load, prefix blocks, models.
        """

    @abc.abstractmethod
    def heartbeat(self, worker_id: str, ttl_s: float) -> bool:
        """Keep a live worker for another ``ttl_s``; False if it had expired or is unknown."""

    @abc.abstractmethod
    def deregister_worker(self, worker_id: str) -> None:
        """Remove a worker and everything it stored; unknown ids are ignored."""

    @abc.abstractmethod
    def list_workers(self, kind: WorkerKind | None = None) -> list[WorkerInfo]:
        """Live workers (of one kind, if given), sorted by worker id."""

    # Load
    @abc.abstractmethod
    def put_load(self, worker_id: str, load: WorkerLoad) -> None:
        """Replace a worker's load report."""

    @abc.abstractmethod
    def get_loads(self) -> dict[str, WorkerLoad]:
        """The latest load of each live worker that reported one."""

    # Prefix-block index
    @abc.abstractmethod
    def add_prefix_blocks(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        """Record that a worker holds the blocks with these hashes (idempotent)."""

    @abc.abstractmethod
    def remove_prefix_blocks(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        """Forget these blocks for a worker (evicted); hashes it does not hold are ignored."""

    @abc.abstractmethod
    def match_prefix(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        """For each live worker, how many leading hashes of this chain it holds.

        The count stops at the first hash the worker lacks; workers with a count of 0 are left out.
        """

    # Latency models
    @abc.abstractmethod
    def put_model(self, worker_id: str, name: str, coefficients: Mapping[str, float]) -> None:
        """Replace the coefficients of the latency model ``name`` fitted for one worker."""

    @abc.abstractmethod
    def get_models(self, name: str) -> dict[str, dict[str, float]]:
        """Coefficients of the model ``name`` for each live worker that has one."""

    # Leases
    @abc.abstractmethod
    def acquire_lease(self, lease_id: str, owner: str, ttl_s: float) -> bool:
        """Take the lease if nobody holds it (atomically); it lapses after ``ttl_s``."""

    @abc.abstractmethod
    def renew_lease(self, lease_id: str, owner: str, ttl_s: float) -> bool:
        """Extend a lease ``owner`` still holds to ``ttl_s`` from now; False if it does not."""

    @abc.abstractmethod
    def release_lease(self, lease_id: str, owner: str) -> bool:
        """Give the lease up; False (and nothing changes) unless ``owner`` holds it."""

    # Batched: what a worker's heartbeat writes and a router's refresh reads, each in one round
    # trip where the backend can (these defaults compose the calls above; backends override).
    def report(self, worker_id: str, ttl_s: float, load: WorkerLoad,
               models: Mapping[str, Mapping[str, float]]) -> bool:
        """``heartbeat``, then ``put_load`` and ``put_model`` for each model; what heartbeat
        returned (False: the worker had expired, and what it wrote is never visible)."""
        check_report(ttl_s, models)
        alive = self.heartbeat(worker_id, ttl_s)
        self.put_load(worker_id, load)
        for name, coefficients in models.items():
            self.put_model(worker_id, name, coefficients)
        return alive

    def snapshot(self, model_names: Sequence[str]) -> Snapshot:
        """``list_workers()``, ``get_loads()`` and ``get_models(name)`` for each name, at once."""
        return Snapshot(self.list_workers(), self.get_loads(), {name: self.get_models(name) for name in model_names})

    @abc.abstractmethod
    def close(self) -> None:
        """Drop this client's connections; the shared state itself stays."""

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Input checks shared by the backends: bad input fails at the edge, before any state changes.


def check_kind(kind: object) -> None:
    if kind not in WORKER_KINDS:
        raise ValueError(f"worker kind must be one of {', '.join(WORKER_KINDS)}, got {kind!r}")


def check_ttl(ttl_s: object, what: str = "ttl_s") -> None:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not 0 < ttl_s < math.inf:
        raise ValueError(f"{what} must be a positive, finite number of seconds, got {ttl_s!r}")


def check_hashes(block_hashes: Sequence[bytes]) -> None:
    if isinstance(block_hashes, bytes | str):
        raise ValueError("block_hashes must be a sequence of hashes, not a single bytes/str value")
    for h in block_hashes:
        if not isinstance(h, bytes) or not h:
            raise ValueError(f"each block hash must be non-empty bytes, got {h!r}")


def check_report(ttl_s: float, models: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """A report's models as plain-float copies by name; ValueError for a bad TTL, name or value."""
    check_ttl(ttl_s)
    for name in models:
        check_name("model name", name)
    return {name: check_coefficients(coefficients) for name, coefficients in models.items()}


def check_coefficients(coefficients: Mapping[str, float]) -> dict[str, float]:
    """A plain-float copy of ``coefficients``; ValueError for a bad name or a non-finite value."""
    out = {}
    for key, value in coefficients.items():
        check_name("coefficient name", key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"coefficient {key!r} must be a finite number, got {value!r}")
        out[key] = float(value)
    return out
