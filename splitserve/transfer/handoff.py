"""One request's KV handoff: where it goes, how the prefill side streams it, how the decode side
takes it in.

- ``KVDestination`` (splitserve.protocol): what a decode worker hands out after reserving
  blocks for a request (its receiver's endpoint, the block table that the prompt's K/V
  belong in, and ``start_token``: the positions before it the decode worker already holds).
- ``KVStreamer`` (prefill side; the engine's ``KVExporter``): as each layer group of a step
  lands in the cache, it copies out every routed request's new tokens from the destination's
  ``start_token`` on and queues them, one sending thread per destination, so the wire runs
  while the next layers compute. ``finish`` waits until every chunk of a request was
  acknowledged.
- ``KVIngest`` (decode side; the receiver's sink): writes a chunk only into blocks the request
  still holds and only at positions it expects (from its ``start_token`` on: the blocks before
  are shared with other requests), under a lock that ``cancel`` also takes, so a late chunk can
  never land in blocks that were given back; it tracks which (layer, token) cells arrived and
  reports the request complete when all did. Re-sent chunks are harmless.

Neither side knows why the decode worker holds a prefix, or which requests share it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from splitserve.engine.engine import KVSlice
from splitserve.protocol import KVDestination
from splitserve.transfer.base import KVSender, TransferError
from splitserve.transfer.kv_io import covering_blocks, gather_kv, scatter_chunk
from splitserve.transfer.manifest import KVManifest

logger = logging.getLogger(__name__)


@dataclass
class _Route:
    destination: KVDestination
    futures: list[Future] = field(default_factory=list)
    num_chunks: int = 0
    num_bytes: int = 0  # payload bytes on the wire, after the codec
    num_resends: int = 0  # chunks sent again after a NACK (corruption) or a broken link
    error: BaseException | None = None


@dataclass(frozen=True)
class HandoffReport:
    """What one request's KV stream cost: chunks and wire bytes, and how long ``finish`` waited
    for the last acknowledgements after the prompt's compute was done."""

    num_chunks: int
    num_bytes: int
    num_resends: int
    wait_s: float


class KVStreamer:
    """The prefill worker's ``KVExporter``: streams routed requests' K/V, a layer group at a time.

    kv_cache: the runner's ``[layers, 2, slots, kv_heads, head_dim]`` cache. make_sender(backend,
    endpoint) opens a sender (kept per endpoint). layers_per_chunk: consecutive layers that go
    as one chunk (fewer, larger messages; the last group may be smaller).
    """

    def __init__(
        self,
        worker_id: str,
        kv_cache: torch.Tensor,
        block_size: int,
        make_sender: Callable[[str, str], KVSender],
        layers_per_chunk: int = 1,
    ):
        if layers_per_chunk < 1:
            raise ValueError(f"layers_per_chunk must be >= 1, got {layers_per_chunk}")
        self.worker_id = worker_id
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.num_layers = kv_cache.shape[0]
        self.layers_per_chunk = layers_per_chunk
        self._make_sender = make_sender
        self._senders: dict[tuple[str, str], tuple[KVSender, ThreadPoolExecutor]] = {}
        self._routes: dict[str, _Route] = {}
        self._lock = threading.Lock()
        self._num_corrupt_sends = 0

    # ------------------------------------------------------------------ request lifecycle

    def route(self, request_id: str, destination: KVDestination) -> None:
        """Send this request's K/V to ``destination`` (call before the request is scheduled)."""
        with self._lock:
            if request_id in self._routes:
                raise ValueError(f"request {request_id!r} already has a KV destination")
            self._routes[request_id] = _Route(destination)

    def failure(self, request_id: str) -> BaseException | None:
        """The first error of the request's stream so far, if any."""
        with self._lock:
            route = self._routes.get(request_id)
            return route.error if route is not None else None

    def finish(self, request_id: str, timeout_s: float | None = None) -> HandoffReport:
        """Wait until every chunk queued for the request was acknowledged, then forget it.

        Raises TransferError if any chunk failed (or did not finish within ``timeout_s``).
        """
        with self._lock:
            route = self._routes.pop(request_id)
        start = time.monotonic()
        deadline = None if timeout_s is None else start + timeout_s
        for future in route.futures:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                future.result(timeout=left)
            except TimeoutError:
                raise TransferError(f"KV of request {request_id} not acknowledged within {timeout_s} s") from None
        if route.error is not None:
            raise TransferError(f"KV of request {request_id} did not land: {route.error}") from route.error
        return HandoffReport(route.num_chunks, route.num_bytes, route.num_resends, time.monotonic() - start)

    def drop(self, request_id: str) -> None:
        """Forget a request without waiting (it was aborted); queued chunks still go out."""
        with self._lock:
            self._routes.pop(request_id, None)

    def inject_corruption(self, num_sends: int = 1) -> None:
        """Fault drill: the next ``num_sends`` chunk sends flip a payload byte after checksumming
        (the receiver NACKs them and they are re-sent)."""
        with self._lock:
            self._num_corrupt_sends += num_sends

    def close(self) -> None:
        with self._lock:
            senders, self._senders = list(self._senders.values()), {}
        for sender, pool in senders:
            pool.shutdown(wait=True)
            sender.close()

    # ----------------------------------------------------------------- the engine's hooks

    def begin_step(self, slices: list[KVSlice]) -> Callable[[int], None]:
        with self._lock:
            known = [(s, self._routes[s.request_id]) for s in slices if s.request_id in self._routes]
        missing = {s.request_id for s in slices} - {s.request_id for s, _ in known}
        if missing:
            logger.warning("exporting requests without a KV destination: %s", sorted(missing))
        routed = [(tail, route) for s, route in known if (tail := _tail(s, route.destination)) is not None]
        group_start = 0

        def on_layer(layer: int) -> None:
            nonlocal group_start
            if (layer + 1 - group_start) < self.layers_per_chunk and layer + 1 < self.num_layers:
                return
            layers = (group_start, layer + 1)
            group_start = layer + 1
            for s, route in routed:
                if route.error is None:
                    self._send(s, route, layers)

        return on_layer

    def _send(self, s: KVSlice, route: _Route, layers: tuple[int, int]) -> None:
        tokens = (s.token_start, s.token_end)
        src_blocks = covering_blocks(s.block_table, *tokens, self.block_size)
        kv = gather_kv(self.kv_cache, layers, src_blocks, tokens, self.block_size)  # a copy: blocks may be reused
        dst = route.destination
        c = self.kv_cache
        manifest = KVManifest(
            request_id=s.request_id, src_worker=self.worker_id, dst_worker=dst.worker_id,
            chunk_index=route.num_chunks, layer_start=layers[0], layer_end=layers[1],
            token_start=s.token_start, token_end=s.token_end, block_size=self.block_size,
            dst_block_ids=covering_blocks(dst.block_ids, *tokens, self.block_size),
            num_kv_heads=c.shape[3], head_dim=c.shape[4], dtype=str(c.dtype).removeprefix("torch."), codec=dst.codec,
        )
        route.num_chunks += 1
        sender, pool = self._sender(dst)
        with self._lock:
            corrupt, self._num_corrupt_sends = self._num_corrupt_sends > 0, max(self._num_corrupt_sends - 1, 0)
        if corrupt:
            sender.inject_corruption(1)

        def send() -> None:
            try:
                report = sender.send(manifest, kv)
            except BaseException as e:
                route.error = route.error or e
                raise
            route.num_bytes += report.payload_nbytes
            route.num_resends += report.attempts - 1

        route.futures.append(pool.submit(send))

    def _sender(self, dst: KVDestination) -> tuple[KVSender, ThreadPoolExecutor]:
        key = (dst.backend, dst.endpoint)
        with self._lock:
            if key not in self._senders:
                pool = ThreadPoolExecutor(1, thread_name_prefix=f"kv-send-{dst.worker_id}")
                self._senders[key] = (self._make_sender(dst.backend, dst.endpoint), pool)
            return self._senders[key]


def _tail(s: KVSlice, destination: KVDestination) -> KVSlice | None:
    """The part of a slice the destination lacks (None: it holds all of it already)."""
    if s.token_end <= destination.start_token:
        return None
    return replace(s, token_start=max(s.token_start, destination.start_token))


@dataclass
class _Expected:
    block_table: tuple[int, ...]
    start_token: int
    arrived: np.ndarray  # [layers, tokens] bool; positions before start_token count as arrived
    on_complete: Callable[[], None]
    done: bool = False


class KVIngest:
    """The decode worker's sink: chunks for reserved requests go into exactly their blocks."""

    def __init__(self, kv_cache: torch.Tensor, block_size: int):
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.num_layers = kv_cache.shape[0]
        self._expected: dict[str, _Expected] = {}
        self._lock = threading.Lock()
        self._stall_s = 0.0
        self._num_stalls = 0
        self._stalls_released = threading.Event()

    def expect(
        self, request_id: str, block_table: Sequence[int], num_tokens: int, on_complete: Callable[[], None],
        start_token: int = 0,
    ) -> None:
        """Accept chunks for tokens [start_token, num_tokens) of a request into ``block_table``
        (the K/V before ``start_token`` are there already, in blocks other requests may share: no
        chunk may touch them); ``on_complete`` runs (on a receiver thread) once every layer of
        every expected token arrived."""
        if not 0 <= start_token < num_tokens:
            raise ValueError(f"start_token must be in [0, {num_tokens}) for a {num_tokens}-token prompt, "
                             f"got {start_token}")
        arrived = np.zeros((self.num_layers, num_tokens), dtype=bool)
        arrived[:, :start_token] = True
        with self._lock:
            self._expected[request_id] = _Expected(tuple(block_table), start_token, arrived, on_complete)

    def cancel(self, request_id: str) -> None:
        """Stop accepting the request's chunks; once this returns none will touch its blocks."""
        with self._lock:
            self._expected.pop(request_id, None)

    def is_complete(self, request_id: str) -> bool:
        with self._lock:
            entry = self._expected.get(request_id)
            return entry is not None and entry.done

    def __call__(self, manifest: KVManifest, kv: torch.Tensor) -> None:
        self._maybe_stall()
        with self._lock:
            entry = self._expected.get(manifest.request_id)
            if entry is None:
                raise ValueError(f"request {manifest.request_id!r} holds no reserved blocks here (aborted or unknown)")
            num_tokens = entry.arrived.shape[1]
            if manifest.token_end > num_tokens:
                raise ValueError(f"tokens up to {manifest.token_end} exceed the reserved prompt of {num_tokens}")
            if manifest.token_start < entry.start_token:
                raise ValueError(f"chunk starts at token {manifest.token_start}; tokens before {entry.start_token} "
                                 "are this worker's cached prefix and take no chunks")
            owned = covering_blocks(entry.block_table, manifest.token_start, manifest.token_end, self.block_size)
            if manifest.dst_block_ids != owned or manifest.block_size != self.block_size:
                raise ValueError(
                    f"chunk targets blocks {manifest.dst_block_ids} (block size {manifest.block_size}); the request "
                    f"holds {owned} (block size {self.block_size}) for those tokens"
                )
            scatter_chunk(self.kv_cache, manifest, kv)
            entry.arrived[manifest.layer_start : manifest.layer_end, manifest.token_start : manifest.token_end] = True
            if entry.done or not entry.arrived.all():
                return
            entry.done = True
        entry.on_complete()

    def inject_stall(self, seconds: float, num_chunks: int = 1) -> None:
        """Fault injection for tests and drills: the next ``num_chunks`` chunks wait ``seconds``
        (math.inf: until ``release_stalls``) before they are taken in (a sender's deadline then
        fails the handoff)."""
        self._stalls_released.clear()
        self._stall_s, self._num_stalls = seconds, num_chunks

    def release_stalls(self) -> None:
        """End every injected stall now, waiting or still to come."""
        self._num_stalls = 0
        self._stalls_released.set()

    def _maybe_stall(self) -> None:
        if self._num_stalls > 0:
            self._num_stalls -= 1
            self._stalls_released.wait(None if self._stall_s == float("inf") else self._stall_s)
