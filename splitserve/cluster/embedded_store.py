"""EmbeddedStore: the MetadataStore contract held by one named, detached Ray actor.

For single-machine use (the default when no Redis URL is given): the state lives in the actor
``splitserve-metadata`` in the Ray namespace ``splitserve``, so every driver, router and worker
attached to the same Ray cluster finds the same state; like Redis keys, it is kept apart per
prefix. ``MemoryStore`` holds all the logic and runs without Ray; the actor holds one per
prefix, and ``EmbeddedStore`` is the client that calls it with ``ray.get``. The state lives as
long as the Ray cluster (or until ``EmbeddedStore.destroy``); TTLs run on the actor's
monotonic clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import ray

from splitserve.cluster import RAY_NAMESPACE
from splitserve.cluster.store import (
    MetadataStore,
    Snapshot,
    StoreConnectionError,
    WorkerInfo,
    WorkerKind,
    WorkerLoad,
    check_coefficients,
    check_hashes,
    check_kind,
    check_report,
    check_ttl,
)
from splitserve.config import DEFAULT_STORE_PREFIX, check_name

ACTOR_NAME = "splitserve-metadata"
P = ParamSpec("P")
R = TypeVar("R")


class MemoryStore(MetadataStore):
    """The whole contract in one process's memory; expiry is checked lazily on each call."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}  # id -> (info, deadline)
        self._loads: dict[str, WorkerLoad] = {}
        self._blocks: dict[str, set[bytes]] = {}  # worker -> hashes it holds
        self._holders: dict[bytes, set[str]] = {}  # hash -> workers holding it
        self._models: dict[str, dict[str, dict[str, float]]] = {}  # name -> worker -> coefficients
        self._leases: dict[str, tuple[str, float]] = {}  # lease -> (owner, deadline)

    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        check_ttl(ttl_s)
        self._purge(info.worker_id)
        self._workers[info.worker_id] = (info, self._clock() + ttl_s)

    def heartbeat(self, worker_id: str, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        if not self._is_live(worker_id):
            return False
        info, _ = self._workers[worker_id]
        self._workers[worker_id] = (info, self._clock() + ttl_s)
        return True

    def deregister_worker(self, worker_id: str) -> None:
        self._purge(worker_id)

    def list_workers(self, kind: WorkerKind | None = None) -> list[WorkerInfo]:
        if kind is not None:
            check_kind(kind)
        self._expire()
        infos = (info for info, _ in self._workers.values() if kind is None or info.kind == kind)
        return sorted(infos, key=lambda info: info.worker_id)

    def put_load(self, worker_id: str, load: WorkerLoad) -> None:
        if self._is_live(worker_id):
            self._loads[worker_id] = load

    def get_loads(self) -> dict[str, WorkerLoad]:
        self._expire()
        return dict(self._loads)

    def add_prefix_blocks(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        check_hashes(block_hashes)
        if not self._is_live(worker_id):
            return
        self._blocks.setdefault(worker_id, set()).update(block_hashes)
        for h in block_hashes:
            self._holders.setdefault(h, set()).add(worker_id)

    def remove_prefix_blocks(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        check_hashes(block_hashes)
        held = self._blocks.get(worker_id, set())
        for h in block_hashes:
            held.discard(h)
            self._drop_holder(h, worker_id)

    def match_prefix(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        check_hashes(block_hashes)
        self._expire()
        counts: dict[str, int] = {}
        candidates: set[str] | None = None  # workers holding every hash so far
        for i, h in enumerate(block_hashes):
            holders = self._holders.get(h, set())
            candidates = set(holders) if candidates is None else candidates & holders
            if not candidates:
                break
            for worker_id in candidates:
                counts[worker_id] = i + 1
        return counts

    def put_model(self, worker_id: str, name: str, coefficients: Mapping[str, float]) -> None:
        check_name("model name", name)
        values = check_coefficients(coefficients)
        if self._is_live(worker_id):
            self._models.setdefault(name, {})[worker_id] = values

    def get_models(self, name: str) -> dict[str, dict[str, float]]:
        check_name("model name", name)
        self._expire()
        return {worker_id: dict(c) for worker_id, c in self._models.get(name, {}).items()}

    def acquire_lease(self, lease_id: str, owner: str, ttl_s: float) -> bool:
        check_name("lease_id", lease_id)
        check_name("owner", owner)
        check_ttl(ttl_s)
        if self._lease_owner(lease_id) is not None:
            return False
        self._leases[lease_id] = (owner, self._clock() + ttl_s)
        return True

    def renew_lease(self, lease_id: str, owner: str, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        if self._lease_owner(lease_id) != owner:
            return False
        self._leases[lease_id] = (owner, self._clock() + ttl_s)
        return True

    def release_lease(self, lease_id: str, owner: str) -> bool:
        if self._lease_owner(lease_id) != owner:
            return False
        del self._leases[lease_id]
        return True

    def close(self) -> None:
        pass

    def _is_live(self, worker_id: str) -> bool:
        entry = self._workers.get(worker_id)
        if entry is not None and entry[1] <= self._clock():
            self._purge(worker_id)
            return False
        return entry is not None

    def _expire(self) -> None:
        now = self._clock()
        for worker_id in [w for w, (_, deadline) in self._workers.items() if deadline <= now]:
            self._purge(worker_id)

    def _purge(self, worker_id: str) -> None:
        """Forget a worker and everything it stored."""
        self._workers.pop(worker_id, None)
        self._loads.pop(worker_id, None)
        for h in self._blocks.pop(worker_id, set()):
            self._drop_holder(h, worker_id)
        for per_worker in self._models.values():
            per_worker.pop(worker_id, None)

    def _drop_holder(self, block_hash: bytes, worker_id: str) -> None:
        holders = self._holders.get(block_hash)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[block_hash]

    def _lease_owner(self, lease_id: str) -> str | None:
        entry = self._leases.get(lease_id)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._leases[lease_id]
            return None
        return entry[0]


@ray.remote(num_cpus=0, max_restarts=0)
class MetadataActor:
    """The actor: one MemoryStore per prefix. Calls run one at a time, so no locks are needed.

    num_cpus=0: the store must never wait for (or take) a CPU slot the workers need.
    """

    def __init__(self) -> None:
        self._stores: dict[str, MemoryStore] = {}

    def call(self, prefix: str, method: Callable[..., R], *args: Any) -> R:
        # Methods travel as MemoryStore functions (by reference), not names: a typo fails in the client.
        assert getattr(MemoryStore, method.__name__, None) is method, f"{method!r} is not a MemoryStore method"
        store = self._stores.get(prefix)
        if store is None:
            store = self._stores[prefix] = MemoryStore()
        return method(store, *args)

    def drop(self, prefix: str) -> None:
        self._stores.pop(prefix, None)


class EmbeddedStore(MetadataStore):
    """Client of the named actor ``actor_name``, created on first use; state kept per ``prefix``.

    Needs a connected Ray (``ray.init`` first). Each call is one actor round trip, waited for
    at most ``timeout_s``.
    """

    def __init__(self, prefix: str = DEFAULT_STORE_PREFIX, actor_name: str = ACTOR_NAME, timeout_s: float = 30.0):
        check_name("prefix", prefix)
        check_name("actor_name", actor_name)
        check_ttl(timeout_s, "timeout_s")
        if not ray.is_initialized():
            raise RuntimeError("EmbeddedStore needs a connected Ray cluster: call ray.init() first")
        self.prefix = prefix
        self.actor_name = actor_name
        self._timeout_s = timeout_s
        self._actor = MetadataActor.options(  # type: ignore[attr-defined]
            name=actor_name, namespace=RAY_NAMESPACE, lifetime="detached", get_if_exists=True
        ).remote()

    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        check_ttl(ttl_s)
        self._call(MemoryStore.register_worker, info, ttl_s)

    def heartbeat(self, worker_id: str, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        return self._call(MemoryStore.heartbeat, worker_id, ttl_s)

    def deregister_worker(self, worker_id: str) -> None:
        self._call(MemoryStore.deregister_worker, worker_id)

    def list_workers(self, kind: WorkerKind | None = None) -> list[WorkerInfo]:
        if kind is not None:
            check_kind(kind)
        return self._call(MemoryStore.list_workers, kind)

    def put_load(self, worker_id: str, load: WorkerLoad) -> None:
        self._call(MemoryStore.put_load, worker_id, load)

    def get_loads(self) -> dict[str, WorkerLoad]:
        return self._call(MemoryStore.get_loads)

    def add_prefix_blocks(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        check_hashes(block_hashes)
        self._call(MemoryStore.add_prefix_blocks, worker_id, list(block_hashes))

    def remove_prefix_blocks(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        check_hashes(block_hashes)
        self._call(MemoryStore.remove_prefix_blocks, worker_id, list(block_hashes))

    def match_prefix(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        check_hashes(block_hashes)
        return self._call(MemoryStore.match_prefix, list(block_hashes))

    def put_model(self, worker_id: str, name: str, coefficients: Mapping[str, float]) -> None:
        check_name("model name", name)
        self._call(MemoryStore.put_model, worker_id, name, check_coefficients(coefficients))

    def get_models(self, name: str) -> dict[str, dict[str, float]]:
        check_name("model name", name)
        return self._call(MemoryStore.get_models, name)

    def report(self, worker_id: str, ttl_s: float, load: WorkerLoad,
               models: Mapping[str, Mapping[str, float]]) -> bool:
        checked = check_report(ttl_s, models)
        return self._call(MemoryStore.report, worker_id, ttl_s, load, checked)

    def snapshot(self, model_names: Sequence[str]) -> Snapshot:
        for name in model_names:
            check_name("model name", name)
        return self._call(MemoryStore.snapshot, list(model_names))

    def acquire_lease(self, lease_id: str, owner: str, ttl_s: float) -> bool:
        check_name("lease_id", lease_id)
        check_name("owner", owner)
        check_ttl(ttl_s)
        return self._call(MemoryStore.acquire_lease, lease_id, owner, ttl_s)

    def renew_lease(self, lease_id: str, owner: str, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        return self._call(MemoryStore.renew_lease, lease_id, owner, ttl_s)

    def release_lease(self, lease_id: str, owner: str) -> bool:
        return self._call(MemoryStore.release_lease, lease_id, owner)

    def close(self) -> None:
        """Nothing to drop: the actor (and the state) outlives its clients."""

    def destroy(self) -> None:
        """Forget all state under this prefix, for every client (shutdown, or tests)."""
        self._get(self._actor.drop.remote(self.prefix))

    def _call(self, method: Callable[Concatenate[MemoryStore, P], R], *args: P.args, **kwargs: P.kwargs) -> R:
        assert not kwargs, "actor calls take positional arguments only"
        return self._get(self._actor.call.remote(self.prefix, method, *args))

    def _get(self, ref: ray.ObjectRef) -> Any:
        try:
            return ray.get(ref, timeout=self._timeout_s)
        except ray.exceptions.RayActorError as exc:
            raise StoreConnectionError(f"the metadata actor {self.actor_name!r} is gone: {exc}") from exc
        except ray.exceptions.GetTimeoutError as exc:
            raise StoreConnectionError(
                f"the metadata actor {self.actor_name!r} did not answer within {self._timeout_s} s"
            ) from exc
