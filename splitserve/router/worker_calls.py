"""Calling workers from the router: a ``Visit`` counts a request in flight at one worker until
it leaves, and aborts it there when it leaves before the worker finished it (cancel, error, a
released reservation), which frees its blocks. ``OwnerLease`` is the lease this router holds
its streams at the workers under, renewed while any is in flight, so that a router that dies
leaves no request decoding for nobody. (The calls themselves go through ``ClusterView.call``,
which learns from them which workers are gone.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from splitserve.protocol import StreamLease
from splitserve.router.cluster_view import ClusterView

logger = logging.getLogger(__name__)


@dataclass
class Visit:
    """A request at one worker: counted in flight there from creation until ``leave``."""

    view: ClusterView
    worker_id: str
    handle: Any
    request_id: str
    finished: bool = False  # the worker is done with it: leaving needs no abort

    def __post_init__(self) -> None:
        self.view.inflight[self.worker_id] += 1

    async def leave(self) -> None:
        self.view.inflight[self.worker_id] -= 1
        if not self.finished:
            with contextlib.suppress(Exception):  # the worker may be gone; its blocks went with it
                await asyncio.shield(self.view.call(self.handle.abort.remote(self.request_id), self.worker_id))


class OwnerLease:
    """This router as the owner of the requests it streams from workers: one ``StreamLease``
    (an id for the router, ``lease_s``) that every stream it starts carries, and a task that,
    every third of the lease while any request is in flight, renews it at each worker where one
    is (``renew_streams``: one call per worker, each given a third of the lease to answer, so
    a frozen worker cannot hold the others' renewals back). A worker that stops hearing it
    aborts its requests (worker/stream_leases.py)."""

    def __init__(self, view: ClusterView, lease_s: float):
        self.view = view
        self.lease = StreamLease(f"router-{uuid.uuid4().hex[:12]}", lease_s)
        self._task: asyncio.Task | None = None

    def hold(self) -> StreamLease:
        """The lease for a stream about to start (renewals run from now while any is in flight)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._renew_while_busy())
        return self.lease

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _renew_while_busy(self) -> None:
        while True:
            await asyncio.sleep(self.lease.lease_s / 3)
            busy = [worker_id for worker_id, n in self.view.inflight.items() if n > 0]
            if not busy:
                return
            await asyncio.gather(*(self._renew_at(worker_id) for worker_id in busy))

    async def _renew_at(self, worker_id: str) -> None:
        try:
            call = self.view.handle(worker_id).renew_streams.remote(self.lease.owner)
            await asyncio.wait_for(self.view.call(call, worker_id), self.lease.lease_s / 3)
        except Exception as e:  # gone (its requests migrate) or slow (the next renewal may land)
            logger.debug("router %s: cannot renew its streams at %s: %r", self.lease.owner, worker_id, e)


def no_worker(kind: str, errors: list[str]) -> str:
    detail = f" (last refusal: {errors[-1]})" if errors else ""
    return f"no {kind} worker can take the request now{detail}"
