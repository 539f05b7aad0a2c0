"""DecodeWorker: reserves blocks for a prompt, takes its KV in, and decodes it.

The worker runtime (splitserve.worker) with the KVImport part: ``reserve`` returns where the
prompt's KV goes; ``generate_from`` waits until it all landed, adds the request to the running
batch with the first token the prefill worker sampled, and streams the rest (with the
speculation length the router sets). ``abort`` at any point gives the blocks back, after which
no late chunk can touch them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import torch

from splitserve.config import WorkerConfig
from splitserve.decode_worker.kv_import import KVImport
from splitserve.engine.engine import LoadedModel
from splitserve.engine.sampling_params import SamplingParams
from splitserve.protocol import GenerateDelta, KVDestination
from splitserve.worker.streams import merge_outputs, stream_deltas
from splitserve.worker.worker import Worker


class DecodeWorker(Worker):
    def __init__(self, config: WorkerConfig, loaded: LoadedModel | None = None):
        if config.kind != "decode":
            raise ValueError(f"DecodeWorker needs a config of kind 'decode', got {config.kind!r}")
        super().__init__(config, loaded)
        self.kv = KVImport(self.worker_id, self.engine, self.loop, config.transfer, self.abort)
        self.kv_endpoint = self.kv.endpoint

    async def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> KVDestination:
        """Hold blocks for the prompt; ValueError for a bad request, CapacityError when full."""
        return await self.kv.reserve(request_id, prompt_token_ids, params)

    async def generate_from(
        self, request_id: str, first_token_id: int, generator_state: bytes | None = None,
    ) -> AsyncIterator[GenerateDelta]:
        """Decode a reserved request from its first token; stream the tokens after it.
        ``generator_state``: a seeded request's sampler state, as PrefillResult carries it.

        Raises ServingError when the prompt's KV did not all arrive within the transfer timeout
        (the reservation is released).
        """
        await self.kv.wait_landed(request_id)
        stream = self.loop.open_stream(request_id)
        try:
            state = None if generator_state is None else torch.frombuffer(bytearray(generator_state), dtype=torch.uint8)
            first = await self.loop.call(self.engine.start_reserved, request_id, first_token_id, state)
        except BaseException:
            self.loop.close_stream(request_id)
            raise
        if first.finished:  # the prefill side's result said so too; the stream is empty
            self.loop.close_stream(request_id)
            yield merge_outputs(request_id, [first])
            return
        async for delta in stream_deltas(self.loop, request_id, stream, self.abort):
            yield delta

    async def abort(self, request_id: str) -> None:
        self.kv.release(request_id)
        await super().abort(request_id)

    def inject_stall(self, seconds: float, num_chunks: int = 1) -> None:
        """Fault drill: the next ``num_chunks`` incoming KV chunks wait ``seconds`` first
        (math.inf: until ``release_stalls``)."""
        self.kv.ingest.inject_stall(seconds, num_chunks)

    def release_stalls(self) -> None:
        """Fault drill: end every injected stall now."""
        self.kv.ingest.release_stalls()

    async def stop(self) -> None:
        await asyncio.to_thread(self.kv.stop)
        await super().stop()
