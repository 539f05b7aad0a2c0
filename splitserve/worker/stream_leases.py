"""StreamLeases: the leases under which a worker streams requests to their routers.

A router that dies with streams open leaves requests nobody reads; a worker would decode them
to their last token, holding their blocks and slowing its batch. So each request a router
starts here (``generate``, ``generate_from``) names its owner and a lease (``StreamLease``),
and the router renews, every third of the lease, all it holds at this worker with one call
(``renew``). An owner not heard from for its lease loses every request it holds: each is
aborted through the worker's abort, which frees its blocks and ends its stream. A request
started without a lease (a caller that is no router, a test) is never aborted for silence.

It knows owners and request ids only: not what a request is doing, nor who its owner is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from splitserve.protocol import StreamLease

logger = logging.getLogger(__name__)


class StreamLeases:
    def __init__(self, worker_id: str, abort: Callable[[str], Awaitable[None]]):
        self.worker_id = worker_id
        self._abort = abort
        self._held: dict[str, set[str]] = {}  # owner -> the request ids it holds here
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._lease_s: dict[str, float] = {}
        self.num_expired = 0  # requests aborted because their owner went silent

    def hold(self, request_id: str, lease: StreamLease | None) -> None:
        """Count ``request_id`` as ``lease.owner``'s from now (None: no owner, no lease); the
        owner's lease starts now unless it holds requests here already."""
        if lease is None:
            return
        held = self._held.setdefault(lease.owner, set())
        held.add(request_id)
        self._lease_s[lease.owner] = lease.lease_s
        if lease.owner not in self._expiry:
            self._arm(lease.owner)

    def release(self, request_id: str, lease: StreamLease | None) -> None:
        """The request left (finished, aborted, failed); an owner holding nothing more here is
        forgotten."""
        if lease is None or request_id not in self._held.get(lease.owner, ()):
            return
        held = self._held[lease.owner]
        held.discard(request_id)
        if not held:
            self._forget(lease.owner)

    def renew(self, owner: str) -> int:
        """Keep ``owner``'s requests another lease; how many it holds here (0: none, nothing to
        renew)."""
        if owner not in self._held:
            return 0
        self._expiry.pop(owner).cancel()
        self._arm(owner)
        return len(self._held[owner])

    def num_held(self) -> int:
        return sum(len(held) for held in self._held.values())

    def _arm(self, owner: str) -> None:
        self._expiry[owner] = asyncio.get_running_loop().call_later(
            self._lease_s[owner], lambda: asyncio.ensure_future(self._expire(owner)))

    def _forget(self, owner: str) -> None:
        del self._held[owner], self._lease_s[owner]
        self._expiry.pop(owner).cancel()

    async def _expire(self, owner: str) -> None:
        if owner not in self._held:
            return
        request_ids, lease_s = sorted(self._held[owner]), self._lease_s[owner]
        self._forget(owner)
        logger.warning("%s: router %s renewed nothing for %g s; aborting its %d requests here (%s)",
                       self.worker_id, owner, lease_s, len(request_ids), ", ".join(request_ids))
        self.num_expired += len(request_ids)
        for request_id in request_ids:
            await self._abort(request_id)
