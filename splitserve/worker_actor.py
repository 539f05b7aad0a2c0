"""WorkerActor: the Ray actor every worker runs in -- a thin shell that builds the Worker
inside the actor's process and forwards each call to it.

Why a shell: a process that holds a Ray actor handle loads the actor's class to learn its
methods. Routers hold handles to every worker; with this class what they load is this module
(the configuration and the messages), never the worker code, torch or the model. Each method
forwards to the worker's method of the same name. The one thing it settles first: a transfer
host of "auto" becomes the address of the node the actor runs on.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from splitserve.config import AUTO_HOST, WorkerConfig
from splitserve.engine.continuation import Continuation
from splitserve.engine.sampling_params import SamplingParams
from splitserve.protocol import GenerateDelta, KVDestination, PrefillResult, StreamLease, WorkerStatus


class WorkerActor:
    def __init__(self, config: WorkerConfig):
        from splitserve.worker.worker import Worker  # here, so the module stays light

        self.worker: Any = Worker(on_this_node(config))

    # Lifecycle and pools.

    async def start(self) -> WorkerStatus:
        return await self.worker.start()

    async def stop(self) -> None:
        await self.worker.stop()

    def status(self) -> WorkerStatus:
        return self.worker.status()

    async def set_role(self, role: str) -> WorkerStatus:
        return await self.worker.set_role(role)

    # A request end to end.

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       max_chunk_tokens: int | None = None, continuation: Continuation | None = None,
                       lease: StreamLease | None = None) -> AsyncIterator[GenerateDelta]:
        deltas = self.worker.generate(request_id, prompt_token_ids, params, max_chunk_tokens, continuation, lease)
        async with contextlib.aclosing(deltas):
            async for delta in deltas:  # closing this stream closes the worker's: it aborts the request
                yield delta

    async def set_speculation(self, request_id: str, num_speculative_tokens: int) -> bool:
        return await self.worker.set_speculation(request_id, num_speculative_tokens)

    async def abort(self, request_id: str) -> None:
        await self.worker.abort(request_id)

    async def renew_streams(self, owner: str) -> int:
        return await self.worker.renew_streams(owner)

    async def holds(self, request_id: str) -> bool:
        return await self.worker.holds(request_id)

    # Prefill for a remote worker.

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      destination: KVDestination, max_chunk_tokens: int | None = None) -> PrefillResult:
        return await self.worker.prefill(request_id, prompt_token_ids, params, destination, max_chunk_tokens)

    def stats(self) -> dict[str, int]:
        return self.worker.stats()

    def cpu_times(self) -> dict[str, float]:
        return self.worker.cpu_times()

    def inject_corruption(self, num_sends: int = 1) -> None:
        self.worker.inject_corruption(num_sends)

    # Decode a request prefilled elsewhere.

    async def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> KVDestination:
        return await self.worker.reserve(request_id, prompt_token_ids, params)

    async def renew_reservation(self, request_id: str) -> bool:
        return await self.worker.renew_reservation(request_id)

    async def generate_from(self, request_id: str, first_token_id: int, generator_state: bytes | None = None,
                            lease: StreamLease | None = None) -> AsyncIterator[GenerateDelta]:
        deltas = self.worker.generate_from(request_id, first_token_id, generator_state, lease)
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                yield delta

    def inject_stall(self, seconds: float, num_chunks: int = 1) -> None:
        self.worker.inject_stall(seconds, num_chunks)

    def release_stalls(self) -> None:
        self.worker.release_stalls()


def on_this_node(config: WorkerConfig) -> WorkerConfig:
    """``config`` with an "auto" KV transfer host made this node's address (as Ray knows it)."""
    if config.transfer.host != AUTO_HOST:
        return config
    import ray

    return replace(config, transfer=replace(config.transfer, host=ray.util.get_node_ip_address()))
