"""Deployment: the workers of one serving setup, as Ray actors, started and stopped together.

``ClusterConfig`` says what to run: disaggregated (prefill + decode workers joined by a KV
transfer backend) or colocated (workers doing both phases). ``Deployment.start`` creates each
worker as a named async actor with explicit resources — one GPU each when the cluster has
GPUs, otherwise its share of the CPUs (also its torch thread count) — and waits until every
one loaded its model and joined the store. Actors are named ``{store_prefix}.{kind}-{i}`` in
the ``splitserve`` namespace, so a router on any node finds them by the worker id the store lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import RayActorError

from splitserve.cluster.colocated import ColocatedWorker
from splitserve.cluster.store import DEFAULT_PREFIX, check_name
from splitserve.cluster.worker import TRANSFER_BACKENDS, Worker, WorkerConfig, WorkerStatus
from splitserve.config import EngineConfig
from splitserve.decode_worker import DecodeWorker
from splitserve.errors import CapacityError
from splitserve.prefill_worker import PrefillWorker

logger = logging.getLogger(__name__)

RAY_NAMESPACE = "splitserve"
MODES = ("disaggregated", "colocated")
WORKER_CLASSES: dict[str, type[Worker]] = {
    "prefill": PrefillWorker, "decode": DecodeWorker, "colocated": ColocatedWorker,
}


@dataclass(frozen=True)
class ClusterConfig:
    """What ``splitserve serve`` runs.

    engine: every worker's engine settings; decode_engine, if given, replaces them for decode
    and colocated workers (speculation lives there). num_threads: torch threads per worker
    (None: the cluster's CPUs split evenly between the workers).
    """

    mode: str = "disaggregated"
    num_prefill_workers: int = 1
    num_decode_workers: int = 1
    num_colocated_workers: int = 1
    engine: EngineConfig = field(default_factory=EngineConfig)
    decode_engine: EngineConfig | None = None
    transfer: str = "collective"
    kv_codec: str = "raw"
    layers_per_chunk: int = 6
    num_threads: int | None = None
    host: str = "127.0.0.1"
    redis_url: str | None = None
    store_prefix: str = DEFAULT_PREFIX
    transfer_timeout_s: float = 30.0
    reservation_ttl_s: float = 300.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.transfer not in TRANSFER_BACKENDS:
            raise ValueError(f"transfer must be one of {', '.join(TRANSFER_BACKENDS)}, got {self.transfer!r}")
        counts = self.worker_counts()
        if any(n < 1 for n in counts.values()):
            raise ValueError(f"every worker kind needs at least one worker, got {counts}")
        check_name("store_prefix", self.store_prefix)

    def worker_counts(self) -> dict[str, int]:
        if self.mode == "colocated":
            return {"colocated": self.num_colocated_workers}
        return {"prefill": self.num_prefill_workers, "decode": self.num_decode_workers}

    def worker_configs(self, num_cpus: float, num_gpus: float) -> list[WorkerConfig]:
        counts = self.worker_counts()
        total = sum(counts.values())
        threads = self.num_threads or max(int(num_cpus) // total, 1)
        configs = []
        for kind, count in counts.items():
            engine = self.engine if kind == "prefill" or self.decode_engine is None else self.decode_engine
            if num_gpus >= total and engine.device == "cpu":
                engine = replace(engine, device="cuda")
            for i in range(count):
                configs.append(WorkerConfig(
                    worker_id=f"{self.store_prefix}.{kind}-{i}", kind=kind,  # type: ignore[arg-type]
                    engine=engine, transfer=self.transfer, kv_codec=self.kv_codec,
                    layers_per_chunk=self.layers_per_chunk, num_threads=threads, host=self.host,
                    redis_url=self.redis_url, store_prefix=self.store_prefix,
                    transfer_timeout_s=self.transfer_timeout_s, reservation_ttl_s=self.reservation_ttl_s,
                ))
        return configs


class Deployment:
    """The running workers of a ClusterConfig (Ray must be initialized)."""

    def __init__(self, config: ClusterConfig):
        self.config = config
        self.handles: dict[str, Any] = {}  # worker id -> actor handle
        self.statuses: dict[str, WorkerStatus] = {}

    async def start(self, timeout_s: float = 600.0) -> None:
        """Create every worker and wait until all are ready (model loaded, store joined)."""
        resources = ray.cluster_resources()
        num_gpus = resources.get("GPU", 0)
        configs = self.config.worker_configs(resources.get("CPU", 1), num_gpus)
        on_gpus = num_gpus >= len(configs)
        needed = {"GPU": len(configs)} if on_gpus else {"CPU": sum(wc.num_threads or 1 for wc in configs)}
        # Resources of a deployment stopped a moment ago come back asynchronously: wait a little.
        deadline = time.monotonic() + 30
        while any((free := ray.available_resources()).get(n, 0) < a for n, a in needed.items()):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        for name, amount in needed.items():
            if free.get(name, 0) < amount:
                raise CapacityError(
                    f"the {len(configs)} workers need {amount:g} {name}s; the Ray cluster has {free.get(name, 0):g} "
                    f"free of {resources.get(name, 0):g} (another deployment may hold them)"
                )
        for wc in configs:
            actor = ray.remote(WORKER_CLASSES[wc.kind]).options(
                name=wc.worker_id, namespace=RAY_NAMESPACE,
                num_cpus=0 if on_gpus else wc.num_threads,
                num_gpus=1 if on_gpus else 0,
                max_concurrency=1000,  # async methods: concurrency is requests in flight, not threads
            )
            self.handles[wc.worker_id] = actor.remote(wc)
        try:
            statuses = await asyncio.wait_for(
                asyncio.gather(*(h.start.remote() for h in self.handles.values())), timeout_s
            )
        except BaseException:
            await self.stop()
            raise
        self.statuses = {s.info.worker_id: s for s in statuses}
        logger.info("deployment %s ready: %s", self.config.store_prefix, ", ".join(self.handles))

    @property
    def max_model_len(self) -> int:
        return min(s.max_model_len for s in self.statuses.values())

    async def worker_statuses(self) -> dict[str, WorkerStatus]:
        refs = {wid: h.status.remote() for wid, h in self.handles.items()}
        return {wid: await ref for wid, ref in refs.items()}

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every worker (leave the store, end streams) and kill the actors."""
        handles, self.handles = self.handles, {}
        stops = [h.stop.remote() for h in handles.values()]
        if not stops:
            return
        done, _ = await asyncio.wait([asyncio.ensure_future(_await(r)) for r in stops], timeout=timeout_s)
        for task in done:
            if task.exception() is not None:
                logger.warning("a worker did not stop cleanly: %s", task.exception())
        for handle in handles.values():
            ray.kill(handle)
        for handle in handles.values():  # return once they are gone, so their resources are free
            with contextlib.suppress(RayActorError):
                await asyncio.wait_for(_await(handle.status.remote()), 10)


async def _await(ref: Any) -> Any:
    return await ref
