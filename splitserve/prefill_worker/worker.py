"""PrefillWorker: prompts in, first tokens out, each prompt's KV streamed to a decode worker.

The worker runtime (splitserve.worker) with the KVExport part. Prompts from many requests
batch together in its engine (packed, chunked under the token budget) while their KV streams
out layer by layer.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from splitserve.config import WorkerConfig
from splitserve.engine.engine import LoadedModel
from splitserve.engine.sampling_params import SamplingParams
from splitserve.prefill_worker.kv_export import KVExport
from splitserve.protocol import KVDestination, PrefillResult
from splitserve.worker.worker import Worker


class PrefillWorker(Worker):
    def __init__(self, config: WorkerConfig, loaded: LoadedModel | None = None):
        if config.kind != "prefill":
            raise ValueError(f"PrefillWorker needs a config of kind 'prefill', got {config.kind!r}")
        super().__init__(config, loaded)
        self.export = KVExport(self.worker_id, self.engine, self.loop, config.transfer)

    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, destination: KVDestination
    ) -> PrefillResult:
        """Run the prompt, stream its KV to ``destination``, return the first token (KVExport)."""
        return await self.export.prefill(request_id, prompt_token_ids, params, destination)

    def stats(self) -> dict[str, int]:
        """Handoff counters since start: handoffs, failed_handoffs, kv_chunks, kv_bytes, kv_resends."""
        return asdict(self.export.counters)

    def inject_corruption(self, num_sends: int = 1) -> None:
        """Fault drill: corrupt the next ``num_sends`` KV chunks on the wire (they are re-sent)."""
        self.export.streamer.inject_corruption(num_sends)

    async def stop(self) -> None:
        await super().stop()
        await asyncio.to_thread(self.export.close)
