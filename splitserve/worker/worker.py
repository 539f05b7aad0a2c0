"""Worker: the runtime every worker kind shares, composed from small parts.

- ``engine`` (LLMEngine) stepped by ``loop`` (EngineLoop: its own thread, asyncio calls in);
- ``models`` (StepModels): latency models fitted from the engine's steps;
- ``prefixes`` (PrefixMirror): the prefix cache mirrored into the store's index (workers that
  routers send prompts to);
- ``membership`` and ``heartbeat`` (Membership, Heartbeat): the store entry and its renewals,
  from ``start`` to ``stop``.

A role adds its part after this constructor: the prefill worker a KV exporter
(splitserve.prefill_worker), the decode worker KV reservations and ingest
(splitserve.decode_worker). ``generate`` runs a request end to end, chunked prefill and all,
which is what the colocated worker serves. Workers are plain classes; the serving assembly
makes them Ray actors (async: their methods run on the actor's event loop while the engine
steps on its own thread). Nothing here needs Ray, so a worker also runs in a test process.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator

import torch

from splitserve.cluster.store import WorkerInfo, WorkerLoad
from splitserve.cluster.stores import make_store
from splitserve.config import WorkerConfig
from splitserve.engine.engine import LLMEngine, LoadedModel
from splitserve.engine.sampling_params import SamplingParams
from splitserve.protocol import GenerateDelta, SpeculationLimits, WorkerStatus
from splitserve.worker.engine_loop import EngineLoop
from splitserve.worker.membership import Heartbeat, Membership
from splitserve.worker.prefix_mirror import PrefixMirror
from splitserve.worker.profile import run_profile
from splitserve.worker.step_models import StepModels
from splitserve.worker.streams import stream_deltas


class Worker:
    def __init__(self, config: WorkerConfig, loaded: LoadedModel | None = None):
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.worker_id = config.worker_id
        self.engine = LLMEngine(config.engine, loaded=loaded or LoadedModel.load(config.engine))
        self.loop = EngineLoop(self.engine, name=f"engine-{config.worker_id}")
        self.models = StepModels(fits_prefill=config.kind == "prefill", fits_decode=config.kind != "prefill")
        self.loop.on_step = self.models.record
        # Routers place prompts by the caches of the workers that prefill them.
        self.prefixes = PrefixMirror(self.engine.block_pool) if config.kind != "decode" else None
        self.kv_endpoint = ""  # where KV for this worker lands; a decode role sets it
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
            if self.prefixes is not None:
                self.prefixes.discard_pending()
        store_config = self.config.store
        store = await asyncio.to_thread(make_store, store_config.redis_url, store_config.prefix)
        info = WorkerInfo(worker_id=self.worker_id, kind=self.config.kind, rpc_endpoint=self.worker_id,  # type: ignore[arg-type]
                          kv_endpoint=self.kv_endpoint, node_id=f"{socket.gethostname()}:{os.getpid()}")
        self.membership = Membership(store, info, store_config.ttl_s, self._load, self.models,
                                     self._speculation_limits(), self.prefixes)
        await asyncio.to_thread(self.membership.beat)
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
        await asyncio.to_thread(self.loop.stop)

    def status(self) -> WorkerStatus:
        load = self.loop.load
        return WorkerStatus(
            worker_id=self.worker_id, kind=self.config.kind, max_model_len=self.engine.max_model_len,
            num_free_blocks=load.num_free_blocks, num_total_blocks=load.num_total_blocks,
            num_unfinished=load.num_running_requests,
        )

    # -------------------------------------------------------------------------- requests

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerateDelta]:
        """Run a request from its prompt; ValueError (before the first delta) for bad input."""
        stream = self.loop.open_stream(request_id)
        try:
            await self.loop.call(self.engine.add_request, prompt_token_ids, params, request_id)
        except BaseException:
            self.loop.close_stream(request_id)
            raise
        async for delta in stream_deltas(self.loop, request_id, stream, self.abort):
            yield delta

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
        """Stop a request (wherever it is in this worker) and free its blocks; idempotent."""
        await self.loop.call(self.engine.abort, request_id)
        self.loop.end_stream(request_id)

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
