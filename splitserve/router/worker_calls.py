"""Calling workers from the router: a ``Visit`` counts a request in flight at one worker until
it leaves, and aborts it there when it leaves before the worker finished it (cancel, error, a
released reservation), which frees its blocks. ``OwnerLease`` is the lease this router holds
its streams at the workers under, renewed while any is in flight, so that a router that dies
leaves no request decoding for nobody. ``watched`` reads a worker's stream and asks the worker
about one that stays silent, so a stream whose end was lost fails (and its request moves on)
rather than hang. (The calls themselves go through ``ClusterView.call``, which learns from them
which workers are gone.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from splitserve.errors import StreamLost, WorkerGone
from splitserve.protocol import GenerateDelta, StreamLease
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


async def watched(deltas: AsyncIterator[GenerateDelta], holds: Callable[[], Awaitable[bool]], silence_s: float,
                  worker_id: str, request_id: str) -> AsyncIterator[GenerateDelta]:
    """``deltas`` (a worker's stream of one request) as they come. After ``silence_s`` without
    one, ``holds()`` asks the worker whether the request is still unfinished there (queued,
    reserved or decoding: then its next delta is only late, and the wait goes on). A worker
    that says no twice, a silence apart and no delta between (time enough for a last delta in
    transit), lost the stream's end: StreamLost (a WorkerGone), and the router moves the request
    on from what its client got. A check that fails or does not answer within ``silence_s``
    proves nothing (a dead worker fails its stream by itself; a frozen one loses its
    membership)."""
    end = object()
    pending: asyncio.Future | None = None
    num_no = 0
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(deltas, end))
            done, _ = await asyncio.wait({pending}, timeout=silence_s)
            if done:
                delta, pending, num_no = pending.result(), None, 0
                if delta is end:
                    return
                yield delta
                continue
            try:
                held = await asyncio.wait_for(holds(), silence_s)
            except WorkerGone:
                raise
            except Exception as e:
                logger.debug("request %s: cannot ask worker %s whether it holds it: %r", request_id, worker_id, e)
                held = True
            num_no = 0 if held else num_no + 1
            if num_no >= 2:
                logger.warning("request %s: worker %s no longer holds it, yet its stream has not ended (silent "
                               "for over %g s); moving it on", request_id, worker_id, 2 * silence_s)
                raise StreamLost(worker_id, f"worker {worker_id} lost the end of request {request_id}'s stream (it "
                                            f"no longer holds the request)")
    finally:
        if pending is not None:  # the stream must be still before it can be closed
            pending.cancel()
            await asyncio.wait({pending})
            if not pending.cancelled():
                pending.exception()  # retrieved, so asyncio does not report it (it was raised, or is moot)
        aclose = getattr(deltas, "aclose", None)
        if aclose is not None:
            await aclose()


def no_worker(kind: str, errors: list[str]) -> str:
    detail = f" (last refusal: {errors[-1]})" if errors else ""
    return f"no {kind} worker can take the request now{detail}"
