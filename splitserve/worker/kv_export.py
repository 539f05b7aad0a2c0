"""KVExport: the prefill-for-remote part every worker carries.

It installs a ``KVStreamer`` as the engine's KV exporter: as each layer group of a step lands
in the cache, every routed request's new tokens go to the blocks its decode worker reserved,
so the wire runs while later layers compute. The whole prompt is computed here (this worker's
own prefix cache may supply part of it), but only positions from the destination's
``start_token`` on are sent: the decode worker holds the ones before. ``prefill`` returns once
the first token is sampled and every chunk was acknowledged: a result means the decode worker
holds the whole prompt's KV, and its ``num_kv_bytes`` counts what was sent. It does not know
how the request was placed or what the decode side does next.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from splitserve.config import TransferConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.output import RequestOutput
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import ServingError
from splitserve.protocol import KVDestination, PrefillResult
from splitserve.transfer import TransferError, make_sender
from splitserve.transfer.handoff import HandoffReport, KVStreamer
from splitserve.worker.engine_loop import EngineLoop, StreamEnd


@dataclass
class ExportCounters:
    """Handoffs since start (the fault drills and benchmarks read them)."""

    handoffs: int = 0
    failed_handoffs: int = 0
    kv_chunks: int = 0
    kv_bytes: int = 0
    kv_resends: int = 0

    def add(self, report: HandoffReport) -> None:
        self.handoffs += 1
        self.kv_chunks += report.num_chunks
        self.kv_bytes += report.num_bytes
        self.kv_resends += report.num_resends


class KVExport:
    def __init__(self, worker_id: str, engine: LLMEngine, loop: EngineLoop, transfer: TransferConfig):
        self.loop, self.engine, self.timeout_s = loop, engine, transfer.timeout_s

        def sender(backend: str, endpoint: str):
            return make_sender(backend, endpoint, timeout_s=transfer.timeout_s, auth_key=transfer.auth_key)

        self.streamer = KVStreamer(worker_id, engine.runner.kv_cache, engine.config.block_size, sender,
                                   transfer.layers_per_chunk)
        engine.kv_exporter = self.streamer
        self.counters = ExportCounters()

    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, destination: KVDestination,
        max_chunk_tokens: int | None = None,
    ) -> PrefillResult:
        """Run the prompt (in chunks of at most ``max_chunk_tokens`` beside the requests this
        worker decodes; None: the step budget), stream its KV to ``destination``, return the
        first token.

        Raises ValueError for a bad request and ServingError when the KV did not land.
        """
        start = time.monotonic()
        self.streamer.route(request_id, destination)
        stream = self.loop.open_stream(request_id)
        try:
            await self.loop.call(self.engine.add_request, prompt_token_ids, params, request_id, export_kv=True,
                                 max_chunk_tokens=max_chunk_tokens)
            output = await stream.get()
            if isinstance(output, StreamEnd):
                raise output.error or ServingError(f"request {request_id} was aborted during prefill")
            prefill_s = time.monotonic() - start
            report = await self._finish(request_id, destination)
        finally:
            self.loop.close_stream(request_id)
            self.streamer.drop(request_id)
        self.counters.add(report)
        return _result(request_id, output, prefill_s, report)

    async def _finish(self, request_id: str, destination: KVDestination) -> HandoffReport:
        try:
            return await asyncio.to_thread(self.streamer.finish, request_id, self.timeout_s)
        except TransferError as e:
            self.counters.failed_handoffs += 1
            raise ServingError(f"KV handoff of request {request_id} to {destination.worker_id} failed: {e}") from e

    def close(self) -> None:
        self.streamer.close()


def _result(request_id: str, output: RequestOutput, prefill_s: float, report: HandoffReport) -> PrefillResult:
    return PrefillResult(
        request_id=request_id,
        first_token_id=output.new_token_ids[0],
        text=output.new_text,
        finished=output.finished,
        finish_reason=str(output.finish_reason) if output.finish_reason else None,
        num_prompt_tokens=len(output.prompt_token_ids),
        generator_state=output.generator_state,
        prefill_s=prefill_s,
        handoff_wait_s=report.wait_s,
        num_kv_chunks=report.num_chunks,
        num_kv_bytes=report.num_bytes,
        num_kv_resends=report.num_resends,
    )
