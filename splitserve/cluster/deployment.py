"""Deployment: the workers of one serving setup, as Ray actors, started and stopped together.

``Deployment.start`` creates one named async actor per worker of the ClusterConfig, of the
class the serving assembly gives (constructed with the worker's WorkerConfig), with explicit
resources -- one GPU each when the cluster has enough GPUs, otherwise its share of the CPUs
(its torch thread count, or ``cpus_per_worker``, which may be a fraction), and its pool's
custom resources, which pin it to the nodes that offer them -- and waits until every one
loaded its model and joined the store. Before that it waits, bounded by ``resource_wait_s``
and logging progress, until the cluster has the resources free: nodes may join later. Actors
are named ``{store prefix}.{kind}-{i}`` in the ``splitserve`` namespace, so a router on any node finds
them by the worker id the store lists. With ``restart_workers`` it supervises them: a worker
whose actor died (its process killed, its node gone) is replaced by a new actor of the same
name and configuration, started like the first; routers see the new start in the store and
take it back. It knows the workers' lifecycle calls (``start``, ``status``, ``stop``), not
what they serve.

Every worker process starts with ``MALLOC_ARENA_MAX=1`` (``worker_env``; the deploying
process's own value, where it sets one, wins). glibc gives each thread that allocates an arena
of its own, up to eight per core, and a worker's engine steps on a thread of its own: under
continuous batching, whose tensors change size nearly every step, that arena grew a worker by
0.5-0.9 GiB before it levelled, where the one main arena stays flat (docs/reliability.md). It
must be in the environment when the process starts, so it travels in the actor's runtime_env.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import Counter
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from splitserve.cluster import RAY_NAMESPACE
from splitserve.config import ClusterConfig, WorkerConfig
from splitserve.errors import CapacityError
from splitserve.protocol import WorkerStatus

logger = logging.getLogger(__name__)
_WAIT_LOG_S = 10.0  # how often a deployment waiting for resources says so
_SUPERVISE_S = 1.0  # how often a supervising deployment asks every worker whether it lives
WORKER_MALLOC_ARENA_MAX = "1"  # glibc malloc arenas per worker process (module docstring)


def worker_env() -> dict[str, str]:
    """The environment variables every worker process starts with (module docstring)."""
    return {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", WORKER_MALLOC_ARENA_MAX)}


class Deployment:
    """The running workers of a ClusterConfig (Ray must be initialized). ``actor_class``: the
    class every worker's actor is made from; it takes the worker's WorkerConfig."""

    def __init__(self, config: ClusterConfig, actor_class: type):
        self.config = config
        self.actor_class = actor_class
        self.handles: dict[str, Any] = {}  # worker id -> actor handle
        self.statuses: dict[str, WorkerStatus] = {}
        self.num_restarts = 0
        self._configs: dict[str, WorkerConfig] = {}
        self._on_gpus = False
        self._supervisor: asyncio.Task | None = None

    async def start(self, timeout_s: float = 600.0, cluster_may_grow: bool = True) -> None:
        """Create every worker and wait until all are ready (model loaded, store joined).
        ``cluster_may_grow``: False for a Ray cluster no node will join (one this process
        started), where resources it lacks in all fail at once rather than after the wait."""
        resources = ray.cluster_resources()
        num_gpus = resources.get("GPU", 0)
        configs = self.config.worker_configs(resources.get("CPU", 1), num_gpus)
        on_gpus = num_gpus >= len(configs)
        needed: Counter[str] = Counter({"GPU": len(configs)} if on_gpus else
                                       {"CPU": sum(wc.ray_cpus for wc in configs)})
        for wc in configs:
            needed.update(wc.resources)
        await self._wait_for(needed, len(configs), cluster_may_grow)
        self._on_gpus = on_gpus
        for wc in configs:
            self._configs[wc.worker_id] = wc
            self.handles[wc.worker_id] = self._create(wc)
        try:
            statuses = await asyncio.wait_for(
                asyncio.gather(*(h.start.remote() for h in self.handles.values())), timeout_s
            )
        except BaseException:
            await self.stop()
            raise
        self.statuses = {s.worker_id: s for s in statuses}
        logger.info("deployment %s ready: %s", self.config.store.prefix, ", ".join(self.handles))
        if self.config.restart_workers:
            self._supervisor = asyncio.create_task(self._supervise(timeout_s))

    def _create(self, wc: WorkerConfig) -> Any:
        actor = ray.remote(self.actor_class).options(
            name=wc.worker_id, namespace=RAY_NAMESPACE,
            num_cpus=0 if self._on_gpus else wc.ray_cpus,
            num_gpus=1 if self._on_gpus else 0,
            resources=dict(wc.resources),
            runtime_env={"env_vars": worker_env()},
            max_concurrency=1000,  # async methods: concurrency is requests in flight, not threads
        )
        return actor.remote(wc)

    async def _supervise(self, start_timeout_s: float) -> None:
        """Every ``_SUPERVISE_S``: replace each worker found dead (one that cannot be reached
        for now, or answers slowly, is left alone); until ``stop``."""
        while True:
            await asyncio.sleep(_SUPERVISE_S)
            for worker_id in [w for w, alive in zip(self.handles, await asyncio.gather(
                    *(self._is_alive(h) for h in self.handles.values())), strict=True) if not alive]:
                try:
                    await self._restart(worker_id, start_timeout_s)
                except Exception as e:  # Ray or the store refused it; the next round tries again
                    logger.warning("deployment %s: cannot restart %s yet: %r", self.config.store.prefix, worker_id, e)

    async def _is_alive(self, handle: Any) -> bool:
        try:
            await asyncio.wait_for(_await(handle.status.remote()), 10)
        except RayActorError as e:
            return isinstance(e, ActorUnavailableError)
        except TimeoutError:
            pass
        return True

    async def _restart(self, worker_id: str, start_timeout_s: float) -> None:
        logger.warning("deployment %s: worker %s died; starting a new one", self.config.store.prefix, worker_id)
        with contextlib.suppress(Exception):  # Ray keeps a dead actor's name taken until it is killed
            ray.kill(self.handles[worker_id], no_restart=True)
        handle = self.handles[worker_id] = self._create(self._configs[worker_id])
        try:
            self.statuses[worker_id] = await asyncio.wait_for(_await(handle.start.remote()), start_timeout_s)
        except BaseException:
            with contextlib.suppress(Exception):
                ray.kill(handle)
            raise
        self.num_restarts += 1
        logger.info("deployment %s: worker %s is back (restart %d)", self.config.store.prefix, worker_id,
                    self.num_restarts)

    async def _wait_for(self, needed: Counter[str], num_workers: int, cluster_may_grow: bool) -> None:
        """Until the Ray cluster has ``needed`` free: nodes may join later (an autoscaler, slow
        pods), and a deployment stopped a moment ago frees its resources asynchronously. Logs
        progress; CapacityError (a sentence) after ``resource_wait_s``, or at once for what a
        cluster that cannot grow lacks in all."""
        started = time.monotonic()
        logged = -math.inf  # the first wait is said at once
        while missing := _missing(needed, ray.available_resources()):
            now, total = time.monotonic(), ray.cluster_resources()
            never = not cluster_may_grow and _missing(needed, total)
            if never or now - started >= self.config.resource_wait_s:
                waited = "" if never else f" after {self.config.resource_wait_s:g} s of waiting"
                raise CapacityError(f"the {num_workers} workers need " + ", ".join(
                    f"{needed[n]:g} {n} (the Ray cluster has {free:g} free of {total.get(n, 0):g})"
                    for n, free in missing.items()) + f"{waited} (another deployment may hold them, or no node "
                    "that offers them has joined)")
            if now - logged >= _WAIT_LOG_S:
                logged = now
                logger.info("deployment %s: waiting for %s (%.0f of %.0f s)", self.config.store.prefix,
                            ", ".join(f"{needed[n]:g} {n} ({free:g} free)" for n, free in missing.items()),
                            now - started, self.config.resource_wait_s)
            await asyncio.sleep(0.2)

    @property
    def max_model_len(self) -> int:
        return min(s.max_model_len for s in self.statuses.values())

    async def worker_statuses(self) -> dict[str, WorkerStatus]:
        refs = {wid: h.status.remote() for wid, h in self.handles.items()}
        return {wid: await ref for wid, ref in refs.items()}

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every worker (leave the store, end streams) and kill the actors."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
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


def _missing(needed: Counter[str], free: dict[str, float]) -> dict[str, float]:
    """The needed resources the cluster has too few of free, with what it has."""
    return {name: free.get(name, 0) for name, amount in needed.items() if free.get(name, 0) < amount}


async def _await(ref: Any) -> Any:
    return await ref
