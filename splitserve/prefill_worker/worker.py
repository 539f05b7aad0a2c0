"""PrefillWorker: prompts in, first tokens out, each prompt's KV streamed to a decode worker.

Prompts from many requests batch together in its engine (packed, chunked under the token
budget); as each layer group of a step lands in the cache, the ``KVStreamer`` sends every
routed request's new tokens to the blocks its decode worker reserved, so the wire runs while
later layers compute. ``prefill`` returns once the first token is sampled and every chunk was
acknowledged: a result means the decode worker holds the whole prompt's KV.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from splitserve.cluster.engine_loop import StreamEnd
from splitserve.cluster.worker import Worker, WorkerConfig
from splitserve.engine.engine import LLMEngine, LoadedModel
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import ServingError
from splitserve.transfer import TransferError, make_sender
from splitserve.transfer.handoff import KVDestination, KVStreamer


@dataclass(frozen=True)
class PrefillResult:
    """A prompt's first token and what its prefill cost.

    text: the first token's text as the request's stream shows it (a possible stop-string
    prefix held back). finished: the first token already ended the request (EOS, a stop, or
    max_tokens 1): nothing is left for the decode worker. generator_state: a seeded request's
    sampler RNG state, for the decode worker to continue the same random stream.
    """

    request_id: str
    first_token_id: int
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    generator_state: torch.Tensor | None
    prefill_s: float  # from arrival to the first token, queueing included
    handoff_wait_s: float  # after the first token, until the last chunk was acknowledged
    num_kv_chunks: int
    num_kv_bytes: int
    num_kv_resends: int


class PrefillWorker(Worker):
    kind = "prefill"

    def __init__(self, config: WorkerConfig, loaded: LoadedModel | None = None):
        super().__init__(config, loaded)
        self.counters = {"handoffs": 0, "failed_handoffs": 0, "kv_chunks": 0, "kv_bytes": 0, "kv_resends": 0}

    def _make_engine(self, loaded: LoadedModel) -> LLMEngine:
        engine = LLMEngine(self.config.engine, loaded=loaded)
        timeout_s = self.config.transfer_timeout_s

        def sender(backend: str, endpoint: str):
            return make_sender(backend, endpoint, timeout_s=timeout_s)

        self.streamer = KVStreamer(
            self.config.worker_id, engine.runner.kv_cache, self.config.engine.block_size, sender,
            self.config.layers_per_chunk,
        )
        engine.kv_exporter = self.streamer
        return engine

    latency_model_name = "prefill"

    def _make_latency_model(self):
        from splitserve.router.goodput import PrefillModel

        return PrefillModel()

    def _add_step(self, stats) -> None:
        # A prefill step's time by the prompt tokens it ran: what queued prompts will cost.
        if stats.num_batched_tokens:
            self.latency_model.add(stats.num_batched_tokens, stats.step_time)

    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, destination: KVDestination
    ) -> PrefillResult:
        """Run the prompt, stream its KV to ``destination``, return the first token.

        Raises ValueError for a bad request and ServingError when the KV did not land.
        """
        start = time.monotonic()
        self.streamer.route(request_id, destination)
        stream = self.loop.open_stream(request_id)
        try:
            await self.loop.call(self.engine.add_request, prompt_token_ids, params, request_id, export_kv=True)
            output = await stream.get()
            if isinstance(output, StreamEnd):
                raise output.error or ServingError(f"request {request_id} was aborted during prefill")
            prefill_s = time.monotonic() - start
            try:
                report = await asyncio.to_thread(self.streamer.finish, request_id, self.config.transfer_timeout_s)
            except TransferError as e:
                self.counters["failed_handoffs"] += 1
                raise ServingError(f"KV handoff of request {request_id} to {destination.worker_id} failed: {e}") from e
        finally:
            self.loop.close_stream(request_id)
            self.streamer.drop(request_id)
        self.counters["handoffs"] += 1
        self.counters["kv_chunks"] += report.num_chunks
        self.counters["kv_bytes"] += report.num_bytes
        self.counters["kv_resends"] += report.num_resends
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

    def stats(self) -> dict[str, int]:
        """Handoff counters since start: handoffs, failed_handoffs, kv_chunks, kv_bytes, kv_resends."""
        return dict(self.counters)

    def inject_corruption(self, num_sends: int = 1) -> None:
        """Fault drill: corrupt the next ``num_sends`` KV chunks on the wire (they are re-sent)."""
        self.streamer.inject_corruption(num_sends)

    async def stop(self) -> None:
        await super().stop()
        await asyncio.to_thread(self.streamer.close)
