"""What every worker kind shares: its settings, its engine on an EngineLoop, its membership and
load reports in the MetadataStore, and streaming a request's outputs as GenerateDeltas.

Workers are plain classes; ``cluster.deployment`` makes them Ray actors (async: their methods
run on the actor's event loop while the engine steps on its own thread). Nothing here needs
Ray, so a worker can also run in a test process or behind another RPC layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from splitserve.cluster.engine_loop import EngineLoop, StreamEnd
from splitserve.cluster.store import DEFAULT_PREFIX, WorkerInfo, WorkerKind, WorkerLoad, make_store
from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine, LoadedModel
from splitserve.engine.output import RequestOutput
from splitserve.errors import ServingError
from splitserve.router.api import GenerateDelta

logger = logging.getLogger(__name__)

TRANSFER_BACKENDS = ("collective", "grpc")


@dataclass(frozen=True)
class WorkerConfig:
    """One worker's settings.

    num_threads: torch threads for the engine (None: torch's default). host: the address other
    workers reach this one at (its KV receiver binds there). heartbeat_s / ttl_s: how often the
    worker reports to the store, and how long it stays listed without a report.
    transfer_timeout_s: a KV handoff's deadline (each chunk's send, and the decode side's wait).
    """

    worker_id: str
    kind: WorkerKind
    engine: EngineConfig = field(default_factory=EngineConfig)
    transfer: str = "collective"
    kv_codec: str = "raw"
    layers_per_chunk: int = 6
    num_threads: int | None = None
    host: str = "127.0.0.1"
    redis_url: str | None = None
    store_prefix: str = DEFAULT_PREFIX
    heartbeat_s: float = 0.5
    ttl_s: float = 3.0
    transfer_timeout_s: float = 30.0
    reservation_ttl_s: float = 300.0  # decode side: a reservation never started is released then
    profile_at_start: bool = True  # a few synthetic steps seed the latency model before serving

    def __post_init__(self) -> None:
        if self.transfer not in TRANSFER_BACKENDS:
            raise ValueError(f"transfer must be one of {', '.join(TRANSFER_BACKENDS)}, got {self.transfer!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise ValueError(f"need 0 < heartbeat_s < ttl_s, got {self.heartbeat_s}, {self.ttl_s}")
        if self.transfer_timeout_s <= 0 or self.reservation_ttl_s <= 0:
            raise ValueError(f"transfer_timeout_s and reservation_ttl_s must be positive, got "
                             f"{self.transfer_timeout_s}, {self.reservation_ttl_s}")


@dataclass(frozen=True)
class WorkerStatus:
    """What a worker reports once ready, and on request (tests check idleness with it)."""

    info: WorkerInfo
    max_model_len: int
    num_free_blocks: int
    num_total_blocks: int
    num_unfinished: int  # running, waiting and reserved requests

    @property
    def is_idle(self) -> bool:
        return self.num_unfinished == 0 and self.num_free_blocks == self.num_total_blocks


class Worker:
    """Base of the prefill, decode and colocated workers."""

    kind: WorkerKind
    publishes_prefixes = True  # mirror the prefix cache into the store's index (routers read it)

    def __init__(self, config: WorkerConfig, loaded: LoadedModel | None = None):
        if config.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs a config of kind {self.kind!r}, got {config.kind!r}")
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.worker_id = config.worker_id
        self.engine = self._make_engine(loaded or LoadedModel.load(config.engine))
        self.loop = EngineLoop(self.engine, name=f"engine-{config.worker_id}")
        self._store = None
        self._heartbeat: threading.Thread | None = None
        self._stopped = threading.Event()
        # Prefix-cache changes, appended on the engine thread and published by the heartbeat.
        self._prefix_events: deque[tuple[bytes, bool]] = deque()
        self._published: set[bytes] = set()
        self._must_register = True
        if self.publishes_prefixes:
            self.engine.block_pool.on_cache_change = lambda h, cached: self._prefix_events.append((h, cached))
        # Step statistics, appended on the engine thread; the heartbeat fits and publishes them.
        self._steps: deque = deque(maxlen=8192)
        self.loop.on_step = self._steps.append
        self.latency_model = self._make_latency_model()

    # The latency model a worker fits from its own steps and publishes for the routers: decode
    # and colocated workers fit the step time of a batch (goodput.DecodeStepModel), prefill
    # workers the time of a prefill step by its batched tokens (goodput.PrefillModel).
    latency_model_name = "decode_step"

    def _make_latency_model(self):
        from splitserve.router.goodput import DecodeStepModel

        return DecodeStepModel()

    def _add_step(self, stats) -> None:
        # Decode and verification steps only: a step carrying a prefill chunk is compute-bound
        # per token, a different regime that would skew the marginal cost of a draft.
        if stats.num_batched_tokens == stats.num_requests + stats.num_draft_tokens:
            self.latency_model.add_step(stats)

    def _make_engine(self, loaded: LoadedModel) -> LLMEngine:
        return LLMEngine(self.config.engine, loaded=loaded)

    @property
    def kv_endpoint(self) -> str:
        return ""

    # ------------------------------------------------------------------------- lifecycle

    async def start(self) -> WorkerStatus:
        """Start the engine thread, join the store and begin heart-beating; return the status."""
        self.loop.start(asyncio.get_running_loop())
        if self.config.profile_at_start:
            await self.loop.call(self._profile)
        info = WorkerInfo(
            worker_id=self.worker_id, kind=self.kind, rpc_endpoint=self.worker_id, kv_endpoint=self.kv_endpoint,
            node_id=f"{socket.gethostname()}:{os.getpid()}",
        )
        self._info = info
        self._store = await asyncio.to_thread(make_store, self.config.redis_url, self.config.store_prefix)
        await asyncio.to_thread(self._report)
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.worker_id}",
                                           daemon=True)
        self._heartbeat.start()
        return self.status()

    async def stop(self) -> None:
        """Leave the store, stop heart-beating and the engine (open streams end with an error)."""
        self._stopped.set()
        if self._heartbeat is not None:
            await asyncio.to_thread(self._heartbeat.join, 5.0)
        if self._store is not None:
            try:
                await asyncio.to_thread(self._store.deregister_worker, self.worker_id)
            except Exception:  # the store may be gone first at shutdown; the TTL cleans up
                logger.warning("%s: could not deregister", self.worker_id, exc_info=True)
            self._store.close()
        await asyncio.to_thread(self.loop.stop)

    def status(self) -> WorkerStatus:
        load = self.loop.load
        return WorkerStatus(
            info=self._info, max_model_len=self.engine.max_model_len, num_free_blocks=load.num_free_blocks,
            num_total_blocks=load.num_total_blocks, num_unfinished=load.num_running_requests,
        )

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

    # ---------------------------------------------------------------- membership and load

    def _report(self) -> None:
        """One heartbeat: stay listed (joining afresh if the membership lapsed, which wipes
        what the store held for us), then publish the load and the prefix-cache changes."""
        assert self._store is not None
        store, worker_id = self._store, self.worker_id
        if self._must_register or not store.heartbeat(worker_id, self.config.ttl_s):
            store.register_worker(self._info, self.config.ttl_s)
            self._must_register = False
            self._prefix_changes()
            added, removed = list(self._published), []  # the fresh membership holds nothing yet
        else:
            added, removed = self._prefix_changes()
        try:
            if removed:
                store.remove_prefix_blocks(worker_id, removed)
            if added:
                store.add_prefix_blocks(worker_id, added)
        except Exception:
            self._must_register = True  # resynchronize from scratch next time
            raise
        while self._steps:
            self._add_step(self._steps.popleft())
        store.put_model(worker_id, self.latency_model_name, self.latency_model.to_coefficients())
        spec = self.engine.config.speculative
        store.put_model(worker_id, "speculation", {
            "k_max": float(spec.max_speculative_tokens if spec else 0),
            "k_default": float(spec.num_speculative_tokens if spec else 0),
        })
        load = self.loop.load
        store.put_load(worker_id, WorkerLoad(
            num_queued_prompt_tokens=load.num_queued_prompt_tokens,
            num_running_requests=load.num_running_requests,
            num_free_blocks=load.num_free_blocks,
            num_total_blocks=load.num_total_blocks,
        ))

    def _profile(self) -> None:
        """A few steps over synthetic token ids, on the engine thread before any request: batch
        sizes, prompt lengths and speculation lengths vary so every feature of the latency
        model moves. The requests leave nothing behind (prefix hashes are dropped)."""
        from splitserve.engine.sampling_params import SamplingParams

        engine = self.engine
        vocab = engine.model_config.vocab_size
        spec = engine.config.speculative
        plans = [(n, 4, 0) for n in (16, 64, 256)] + [(1, 8, 0)] * 4
        if spec is not None:
            plans += [(1, 8, k) for k in (1, min(4, spec.max_speculative_tokens))]
        for i, (prompt_len, num_out, k) in enumerate(plans):
            prompt = [(7919 * (i * 1000 + j)) % vocab for j in range(prompt_len)]
            params = SamplingParams(max_tokens=num_out, temperature=0, ignore_eos=True,
                                    num_speculative_tokens=k if spec is not None else None)
            engine.add_request(prompt, params, request_id=f"profile-{self.worker_id}-{i}")
        while engine.has_unfinished_requests():
            last = engine.step_stats[-1] if engine.step_stats else None
            engine.step()
            if engine.step_stats and engine.step_stats[-1] is not last:  # a step that ran records stats
                self._steps.append(engine.step_stats[-1])
        engine.block_pool.reset_prefix_cache()
        self._prefix_events.clear()

    def _prefix_changes(self) -> tuple[list[bytes], list[bytes]]:
        """Net prefix-cache changes since the last call (applied to ``_published``)."""
        latest: dict[bytes, bool] = {}
        while self._prefix_events:
            block_hash, cached = self._prefix_events.popleft()
            latest[block_hash] = cached
        added = [h for h, cached in latest.items() if cached and h not in self._published]
        removed = [h for h, cached in latest.items() if not cached and h in self._published]
        self._published.update(added)
        self._published.difference_update(removed)
        return added, removed

    def _heartbeat_loop(self) -> None:
        while not self._stopped.wait(self.config.heartbeat_s):
            try:
                self._report()
            except Exception:  # a store hiccup must not kill the worker; the next beat retries
                logger.warning("%s: heartbeat failed", self.worker_id, exc_info=True)

    # ------------------------------------------------------------------------- streaming

    async def _stream(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[GenerateDelta]:
        """The request's outputs as deltas until it finishes; outputs that queued up while the
        reader was busy go out merged as one delta. Leaving early aborts the request."""
        finished = False
        try:
            while not finished:
                items = [await stream.get()]
                while not stream.empty():
                    items.append(stream.get_nowait())
                outputs = []
                for item in items:
                    if isinstance(item, StreamEnd):
                        if item.error is not None:
                            raise item.error
                        finished = True  # aborted
                        outputs.append(None)
                        break
                    outputs.append(item)
                    finished = item.finished
                yield merge_outputs(request_id, outputs)
        finally:
            self.loop.close_stream(request_id)
            if not finished:
                with contextlib.suppress(ServingError):  # the engine is gone already
                    await asyncio.shield(self.abort(request_id))


def merge_outputs(request_id: str, outputs: list[RequestOutput | None]) -> GenerateDelta:
    """One delta for consecutive outputs of a request (None: it was aborted)."""
    last = next((o for o in reversed(outputs) if o is not None), None)
    real = [o for o in outputs if o is not None]
    aborted = outputs[-1] is None
    if last is None:
        return GenerateDelta(request_id, [], "", finished=True, finish_reason="abort")
    return GenerateDelta(
        request_id=request_id,
        token_ids=[t for o in real for t in o.new_token_ids],
        text="".join(o.new_text for o in real),
        finished=last.finished or aborted,
        finish_reason="abort" if aborted else (str(last.finish_reason) if last.finish_reason else None),
        num_prompt_tokens=len(last.prompt_token_ids),
        num_output_tokens=len(last.token_ids),
        num_draft_tokens=last.spec.num_draft_tokens,
        num_accepted_tokens=last.spec.num_accepted_tokens,
    )
