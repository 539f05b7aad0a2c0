"""Worker: one engine that can do every phase of a request, composed from small parts.

- ``engine`` (LLMEngine) stepped by ``loop`` (EngineLoop: its own thread, asyncio calls in);
- ``models`` (StepModels): latency models fitted from the engine's steps (prefill, decode step
  and mixed step: a decode step with a prefill chunk in it);
- ``prefixes`` (PrefixMirror): the prefix cache mirrored into the store's index;
- ``export`` (KVExport): ``prefill`` a prompt for a remote worker, its KV streamed out layer by
  layer into that worker's reservation;
- ``kv`` (KVImport): ``reserve`` blocks for a prompt prefilled elsewhere, take its KV in, and
  ``generate_from`` its first token on;
- ``membership`` and ``heartbeat`` (Membership, Heartbeat): the store entry and its renewals,
  from ``start`` to ``stop``;
- ``leases`` (StreamLeases): which router each streamed request belongs to; a router silent
  for its lease (``renew_streams``) has its requests aborted.

``generate`` runs a request end to end, its prefill chunked into the running decode batch.
Every worker can do all three; its ``role`` ("prefill", "decode" or "colocated", listed in the
store as its kind) is the pool routers place work by, a preference rather than a capability,
and ``set_role`` moves it to another pool while it keeps serving what it holds. Workers are
plain classes; the serving assembly makes them Ray actors (async: their methods run on the
actor's event loop while the engine steps on its own thread). Nothing here needs Ray, so a
worker also runs in a test process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import asdict

import torch

from splitserve.cluster.store import WorkerInfo, WorkerLoad
from splitserve.cluster.stores import make_store
from splitserve.config import WORKER_KINDS, WorkerConfig
from splitserve.engine.continuation import Continuation
from splitserve.engine.engine import LLMEngine, LoadedModel
from splitserve.engine.sampling_params import SamplingParams
from splitserve.protocol import (GenerateDelta, KVDestination, PrefillResult, SpeculationLimits, StreamLease,
                                 WorkerStatus)
from splitserve.worker.engine_loop import EngineLoop
from splitserve.worker.kv_export import KVExport
from splitserve.worker.kv_import import KVImport
from splitserve.worker.membership import Heartbeat, Membership
from splitserve.worker.prefix_mirror import PrefixMirror
from splitserve.worker.profile import run_profile
from splitserve.worker.step_models import StepModels
from splitserve.worker.stream_leases import StreamLeases
from splitserve.worker.streams import merge_outputs, stream_deltas

logger = logging.getLogger(__name__)
JOIN_TIMEOUT_S = 60.0  # how long a starting worker waits for a store that does not answer in time


class Worker:
    def __init__(self, config: WorkerConfig, loaded: LoadedModel | None = None):
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.worker_id = config.worker_id
        self.role = config.kind
        self.engine = LLMEngine(config.engine, loaded=loaded or LoadedModel.load(config.engine))
        self.loop = EngineLoop(self.engine, name=f"engine-{config.worker_id}",
                               release_memory_every_s=config.release_memory_every_s)
        self.models = StepModels(fits_prefill=True, fits_decode=True, fits_mixed=True)
        self.loop.on_step = self.models.record
        self.prefixes = PrefixMirror(self.engine.block_pool)  # routers place prompts by cached prefixes
        self.export = KVExport(self.worker_id, self.engine, self.loop, config.transfer)
        self.kv = KVImport(self.worker_id, self.engine, self.loop, config.transfer, self.abort)
        self.leases = StreamLeases(self.worker_id, self.abort)
        self.num_aborted = 0  # requests stopped unfinished (a client cancel, a released reservation, an orphan)
        self.membership: Membership | None = None
        self.heartbeat: Heartbeat | None = None

    # ------------------------------------------------------------------------- lifecycle

    async def start(self) -> WorkerStatus:
        """Start the engine thread, profile, join the store and begin heart-beating."""
        self.loop.start(asyncio.get_running_loop())
        if self.config.profile_at_start:
            steps = await self.loop.call(run_profile, self.engine, f"profile-{self.worker_id}")
            for stats in steps:
                self.models.record(stats)
            self.prefixes.discard_pending()
        store_config = self.config.store
        store = await asyncio.to_thread(make_store, store_config)
        info = WorkerInfo(worker_id=self.worker_id, kind=self.role, rpc_endpoint=self.worker_id,  # type: ignore[arg-type]
                          kv_endpoint=self.kv.endpoint, node_id=f"{socket.gethostname()}:{os.getpid()}")
        self.membership = Membership(store, info, store_config.ttl_s, self._load, self.models,
                                     self._speculation_limits(), self.prefixes)
        await asyncio.to_thread(self.membership.join, JOIN_TIMEOUT_S, store_config.heartbeat_s)
        self.heartbeat = Heartbeat(f"heartbeat-{self.worker_id}", store_config.heartbeat_s, self.membership.beat)
        self.heartbeat.start()
        return self.status()

    async def stop(self) -> None:
        """Leave the store, stop heart-beating and the engine (open streams end with an error)."""
        if self.heartbeat is not None:
            await asyncio.to_thread(self.heartbeat.stop)
        if self.membership is not None:
            await asyncio.to_thread(self.membership.leave)
            self.membership.store.close()
        await asyncio.to_thread(self.kv.stop)
        await asyncio.to_thread(self.loop.stop)
        await asyncio.to_thread(self.export.close)

    async def set_role(self, role: str) -> WorkerStatus:
        """Move to another pool: the store lists this worker under ``role`` from the next beat,
        so routers place new work by it; what the worker holds (requests running, prefills,
        reservations) carries on unchanged. ValueError for an unknown role."""
        if role not in WORKER_KINDS:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(WORKER_KINDS)}")
        if role != self.role:
            logger.info("%s: role %s -> %s", self.worker_id, self.role, role)
            self.role = role
            if self.membership is not None:
                self.membership.change_kind(role)
                await asyncio.to_thread(self.membership.beat)
        return self.status()

    def status(self) -> WorkerStatus:
        load = self.loop.load
        return WorkerStatus(
            worker_id=self.worker_id, kind=self.role, max_model_len=self.engine.max_model_len,
            num_free_blocks=load.num_free_blocks, num_total_blocks=load.num_total_blocks,
            num_unfinished=load.num_running_requests,
        )

    # -------------------------------------------------------------------------- requests

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        max_chunk_tokens: int | None = None, continuation: Continuation | None = None,
        lease: StreamLease | None = None,
    ) -> AsyncIterator[GenerateDelta]:
        """Run a request from its prompt, its prefill in chunks of at most ``max_chunk_tokens``
        (None: the engine's step budget) mixed into the decode batch; ValueError (before the
        first delta) for bad input. ``continuation``: what it produced on a worker that died;
        it goes on from there (the deltas carry the tokens after those). ``lease``: its router
        and how long that router may stay silent before the request is aborted (StreamLeases)."""
        stream = self.loop.open_stream(request_id)
        try:
            await self.loop.call(self.engine.add_request, prompt_token_ids, params, request_id,
                                 max_chunk_tokens=max_chunk_tokens, continuation=continuation)
        except BaseException:
            self.loop.close_stream(request_id)
            raise
        async for delta in self._leased(request_id, stream, lease):
            yield delta

    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, destination: KVDestination,
        max_chunk_tokens: int | None = None,
    ) -> PrefillResult:
        """Run the prompt (chunked, like ``generate``'s), stream its KV to ``destination``, return
        the first token (KVExport)."""
        return await self.export.prefill(request_id, prompt_token_ids, params, destination, max_chunk_tokens)

    async def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> KVDestination:
        """Hold blocks for a prompt prefilled elsewhere; ValueError for a bad request,
        CapacityError when full (KVImport)."""
        return await self.kv.reserve(request_id, prompt_token_ids, params)

    async def renew_reservation(self, request_id: str) -> bool:
        """Keep a reservation another lease (KVImport.renew); False when it is gone. Runs on the
        actor's event loop, never waiting for the engine."""
        return self.kv.renew(request_id)

    async def generate_from(
        self, request_id: str, first_token_id: int, generator_state: bytes | None = None,
        lease: StreamLease | None = None,
    ) -> AsyncIterator[GenerateDelta]:
        """Decode a reserved request from its first token; stream the tokens after it.
        ``generator_state``: a seeded request's sampler state, as PrefillResult carries it;
        ``lease``: as ``generate``'s.

        Raises ServingError when the prompt's KV did not all arrive within the transfer timeout
        (the reservation is released).
        """
        await self.kv.wait_landed(request_id)
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
        async for delta in self._leased(request_id, stream, lease):
            yield delta

    async def _leased(self, request_id: str, stream: asyncio.Queue,
                      lease: StreamLease | None) -> AsyncIterator[GenerateDelta]:
        """The request's deltas, held under ``lease`` until it leaves."""
        self.leases.hold(request_id, lease)
        try:
            async for delta in stream_deltas(self.loop, request_id, stream, self.abort, self.config.stream_interval):
                yield delta
        finally:
            self.leases.release(request_id, lease)

    async def holds(self, request_id: str) -> bool:
        """Whether the request is unfinished here (queued, prefilling, reserved or decoding):
        the router asks about a stream that stays silent (a stream whose request is no longer
        held here lost its end)."""
        return await self.loop.call(self.engine.has_request, request_id)

    async def renew_streams(self, owner: str) -> int:
        """Keep the requests router ``owner`` streams from here another lease; how many it
        holds here. Runs on the actor's event loop, never waiting for the engine."""
        return self.leases.renew(owner)

    async def set_speculation(self, request_id: str, num_speculative_tokens: int) -> bool:
        """Change a running request's k from the next step; False if it is not running here
        (finished already, or not started). ValueError for a k the engine cannot do."""
        def apply() -> bool:
            if not self.engine.is_running(request_id):
                return False
            self.engine.set_speculation(request_id, num_speculative_tokens)
            return True

        return await self.loop.call(apply)

    async def abort(self, request_id: str) -> None:
        """Stop a request (wherever it is in this worker: queued, prefilling, reserved, decoding)
        and free its blocks; idempotent. No late KV chunk can touch them afterwards."""
        self.kv.release(request_id)
        if await self.loop.call(self.engine.abort, request_id):
            self.num_aborted += 1
        self.loop.end_stream(request_id)

    # --------------------------------------------------------------- counters and drills

    def stats(self) -> dict[str, int]:
        """Since start: the handoffs it prefilled (handoffs, failed_handoffs, kv_chunks, kv_bytes,
        kv_resends); the requests it stopped unfinished (aborted), and of those, the ones whose
        router went silent (orphans_aborted)."""
        return asdict(self.export.counters) | {"aborted": self.num_aborted, "orphans_aborted": self.leases.num_expired}

    def cpu_times(self) -> dict[str, float]:
        """CPU seconds since start: ``engine`` (the engine thread: steps and calls between
        them) and ``process`` (the whole worker process: also its event loop, Ray calls, token
        streams, KV transfer threads and heartbeats)."""
        return {"engine": self.loop.cpu_s, "process": time.process_time()}

    def inject_corruption(self, num_sends: int = 1) -> None:
        """Fault drill: corrupt the next ``num_sends`` KV chunks it sends (they are re-sent)."""
        self.export.streamer.inject_corruption(num_sends)

    def inject_stall(self, seconds: float, num_chunks: int = 1) -> None:
        """Fault drill: the next ``num_chunks`` incoming KV chunks wait ``seconds`` first
        (math.inf: until ``release_stalls``)."""
        self.kv.ingest.inject_stall(seconds, num_chunks)

    def release_stalls(self) -> None:
        """Fault drill: end every injected stall now."""
        self.kv.ingest.release_stalls()

    # ---------------------------------------------------------------------------- helpers

    def _load(self) -> WorkerLoad:
        load = self.loop.load
        return WorkerLoad(num_queued_prompt_tokens=load.num_queued_prompt_tokens,
                          num_running_requests=load.num_running_requests,
                          num_free_blocks=load.num_free_blocks, num_total_blocks=load.num_total_blocks)

    def _speculation_limits(self) -> SpeculationLimits:
        spec = self.engine.config.speculative
        return SpeculationLimits(spec.max_speculative_tokens, spec.num_speculative_tokens) if spec else \
            SpeculationLimits(0, 0)
