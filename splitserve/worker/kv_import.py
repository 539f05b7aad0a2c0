"""KVImport: the part every worker carries to take a handed-off request in.

A request arrives twice. ``reserve`` holds blocks for the prompt (CapacityError when there is
no room), sharing those of a prefix the engine's prefix cache already holds, and returns a
``KVDestination`` whose ``start_token`` says where that prefix ends; chunks then land through
the worker's KV receiver into exactly the other blocks (``KVIngest``). ``wait_landed`` returns
once every layer of every prompt token from ``start_token`` on arrived, after which the blocks
are the engine's alone. ``release`` at any point stops further chunks and forgets the
reservation (the caller then aborts the request in the engine, which gives the blocks back,
the shared ones keeping their other holders). A reservation is a lease: ``renew`` (its router,
while the prompt is prefilled elsewhere) keeps it another ``reservation_lease_s``; one not
renewed for that long is released, so a router that died cannot strand the blocks. It does not
know what the request decodes or who sent its KV.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from splitserve.config import TransferConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import ServingError
from splitserve.protocol import KVDestination
from splitserve.transfer import make_receiver
from splitserve.transfer.handoff import KVIngest
from splitserve.worker.engine_loop import EngineLoop

logger = logging.getLogger(__name__)


class KVImport:
    def __init__(self, worker_id: str, engine: LLMEngine, loop: EngineLoop, transfer: TransferConfig,
                 abort: Callable[[str], Awaitable[None]]):
        self.worker_id, self.engine, self.loop, self.transfer = worker_id, engine, loop, transfer
        self._abort = abort  # the worker's abort: expiry and a failed wait release through it
        self.ingest = KVIngest(engine.runner.kv_cache, engine.config.block_size)
        self.receiver = make_receiver(transfer.backend, self.ingest, host=transfer.host,
                                      auth_key=transfer.auth_key)
        self._landed: dict[str, asyncio.Future] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}

    @property
    def endpoint(self) -> str:
        return self.receiver.endpoint

    async def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> KVDestination:
        """Hold blocks for the prompt (a cached prefix's shared); ValueError for a bad request,
        CapacityError when full."""
        reservation = await self.loop.call(self.engine.reserve, prompt_token_ids, params, request_id)
        aio = asyncio.get_running_loop()
        landed = self._landed[request_id] = aio.create_future()

        def on_complete() -> None:
            aio.call_soon_threadsafe(lambda: landed.done() or landed.set_result(None))

        start = reservation.num_cached_tokens
        self.ingest.expect(request_id, reservation.block_ids, len(prompt_token_ids), on_complete, start)
        self._lease(request_id)
        return KVDestination(self.worker_id, self.transfer.backend, self.endpoint, reservation.block_ids,
                             self.transfer.kv_codec, start, lease_s=self.transfer.reservation_lease_s)

    def renew(self, request_id: str) -> bool:
        """Keep the reservation another ``reservation_lease_s``; False when there is none (it
        lapsed, was released or started)."""
        if request_id not in self._landed:
            return False
        self._expiry.pop(request_id).cancel()
        self._lease(request_id)
        return True

    def _lease(self, request_id: str) -> None:
        """Release the reservation ``reservation_lease_s`` from now unless renewed or started:
        a router that vanished between reserve and generate_from must not strand the blocks."""
        self._expiry[request_id] = asyncio.get_running_loop().call_later(
            self.transfer.reservation_lease_s, lambda: asyncio.ensure_future(self._expire(request_id)))

    async def wait_landed(self, request_id: str) -> None:
        """Until the prompt's KV all arrived; ValueError without a reservation, ServingError
        (the reservation released) when it did not arrive within the transfer timeout."""
        landed = self._landed.get(request_id)
        if landed is None:
            raise ValueError(f"request {request_id!r} has no reservation on {self.worker_id}")
        try:
            await asyncio.wait_for(landed, self.transfer.timeout_s)
        except TimeoutError:
            await self._abort(request_id)
            raise ServingError(
                f"KV of request {request_id} did not arrive at {self.worker_id} within {self.transfer.timeout_s} s"
            ) from None
        self.ingest.cancel(request_id)  # complete: from now on its blocks are the engine's alone
        del self._landed[request_id]
        self._expiry.pop(request_id).cancel()

    def release(self, request_id: str) -> None:
        """No chunk may land for the request from now on; forget its reservation."""
        self.ingest.cancel(request_id)  # first: the blocks go back right after this
        landed = self._landed.pop(request_id, None)
        if landed is not None:
            landed.cancel()
        expiry = self._expiry.pop(request_id, None)
        if expiry is not None:
            expiry.cancel()

    def stop(self) -> None:
        self.receiver.stop()

    async def _expire(self, request_id: str) -> None:
        if request_id in self._landed:
            logger.warning("%s: the reservation of request %s was not renewed for %g s; releasing its blocks",
                           self.worker_id, request_id, self.transfer.reservation_lease_s)
            await self._abort(request_id)
