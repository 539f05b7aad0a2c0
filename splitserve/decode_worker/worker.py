"""DecodeWorker: reserves blocks for a prompt, takes its KV in, and decodes it.

A request arrives twice. ``reserve`` holds blocks for the prompt (refusing with CapacityError
when there is no room) and returns a ``KVDestination``; chunks then land through the worker's
KV receiver into exactly those blocks (``KVIngest``). ``generate`` waits until every layer of
every prompt token arrived, adds the request to the running batch with the first token the
prefill worker sampled, and streams the rest. ``abort`` at any point gives the blocks back,
after which no late chunk can touch them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import torch

from splitserve.cluster.worker import Worker, WorkerConfig, merge_outputs
from splitserve.engine.engine import LoadedModel
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import ServingError
from splitserve.router.api import GenerateDelta
from splitserve.transfer import make_receiver
from splitserve.transfer.handoff import KVDestination, KVIngest

logger = logging.getLogger(__name__)


class DecodeWorker(Worker):
    kind = "decode"
    publishes_prefixes = False  # routers place prompts by the prefill workers' caches

    def __init__(self, config: WorkerConfig, loaded: LoadedModel | None = None):
        super().__init__(config, loaded)
        self.ingest = KVIngest(self.engine.runner.kv_cache, config.engine.block_size)
        self.receiver = make_receiver(config.transfer, self.ingest, host=config.host)
        self._landed: dict[str, asyncio.Future] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}

    @property
    def kv_endpoint(self) -> str:
        return self.receiver.endpoint

    async def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> KVDestination:
        """Hold blocks for the prompt; ValueError for a bad request, CapacityError when full."""
        table = await self.loop.call(self.engine.reserve, prompt_token_ids, params, request_id)
        aio = asyncio.get_running_loop()
        landed = self._landed[request_id] = aio.create_future()

        def on_complete() -> None:
            aio.call_soon_threadsafe(lambda: landed.done() or landed.set_result(None))

        self.ingest.expect(request_id, table, len(prompt_token_ids), on_complete)
        # A router that vanished between reserve and generate must not strand the blocks.
        self._expiry[request_id] = aio.call_later(
            self.config.reservation_ttl_s, lambda: asyncio.ensure_future(self._expire(request_id))
        )
        return KVDestination(self.worker_id, self.config.transfer, self.kv_endpoint, tuple(table),
                             self.config.kv_codec)

    async def generate(
        self, request_id: str, first_token_id: int, generator_state: torch.Tensor | None = None,
    ) -> AsyncIterator[GenerateDelta]:
        """Decode a reserved request from its first token; stream the tokens after it.

        Raises ServingError when the prompt's KV did not all arrive within the transfer timeout
        (the reservation is released).
        """
        landed = self._landed.get(request_id)
        if landed is None:
            raise ValueError(f"request {request_id!r} has no reservation on {self.worker_id}")
        try:
            await asyncio.wait_for(landed, self.config.transfer_timeout_s)
        except TimeoutError:
            await self.abort(request_id)
            raise ServingError(
                f"KV of request {request_id} did not arrive at {self.worker_id} within "
                f"{self.config.transfer_timeout_s} s"
            ) from None
        self.ingest.cancel(request_id)  # complete: from now on its blocks are the engine's alone
        del self._landed[request_id]
        self._expiry.pop(request_id).cancel()
        stream = self.loop.open_stream(request_id)
        try:
            first = await self.loop.call(self.engine.start_reserved, request_id, first_token_id, generator_state)
        except BaseException:
            self.loop.close_stream(request_id)
            raise
        if first.finished:  # the prefill side's result said so too; the stream is empty
            self.loop.close_stream(request_id)
            yield merge_outputs(request_id, [first])
            return
        async for delta in self._stream(request_id, stream):
            yield delta

    async def abort(self, request_id: str) -> None:
        self.ingest.cancel(request_id)  # first: no chunk may land once the blocks go back
        landed = self._landed.pop(request_id, None)
        if landed is not None:
            landed.cancel()
        expiry = self._expiry.pop(request_id, None)
        if expiry is not None:
            expiry.cancel()
        await super().abort(request_id)

    async def _expire(self, request_id: str) -> None:
        if request_id in self._landed:
            logger.warning("%s: reservation of request %s was never started; releasing its blocks",
                           self.worker_id, request_id)
            await self.abort(request_id)

    def inject_stall(self, seconds: float, num_chunks: int = 1) -> None:
        """Fault drill: the next ``num_chunks`` incoming KV chunks wait ``seconds`` first."""
        self.ingest.inject_stall(seconds, num_chunks)

    async def stop(self) -> None:
        await asyncio.to_thread(self.receiver.stop)
        await super().stop()
