"""Handoff: getting a request's first token and its prompt's KV onto a decode worker.

An attempt reserves blocks on the decode-pool worker with the best predicted TPOT (a worker
without room answers CapacityError and the next is asked), then prefills on the prefill-pool
worker with the best predicted TTFT into that reservation; the PrefillResult means every KV
chunk landed. The reservation is a lease the attempt renews meanwhile, so the blocks come back
if this router dies. (Admission is decided before, by the Placer.) The decode worker reserves
from its own prefix cache where it can, and the prefill worker then sends only the prompt's
tail; between decode workers predicted alike, one holding more of the prompt goes first. A
failed attempt (a transfer error, a dead worker) releases its reservation at once and raises
``HandoffFailed``; the next attempt asks other workers first, up to ``attempts``. What happens
after the first token is the Router's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field

from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import CapacityError, ServingError, WorkerGone
from splitserve.protocol import SLO, KVDestination, PrefillResult
from splitserve.router.cluster_view import ClusterView
from splitserve.router.placement import prompt_block_hashes, rank_decode, rank_prefill
from splitserve.router.speculation import Speculation
from splitserve.router.worker_calls import Visit, no_worker

logger = logging.getLogger(__name__)


class HandoffFailed(Exception):
    """One hand-off attempt failed after its reservation was made; another attempt may work."""


@dataclass
class RoutedRequest:
    """One request on its way through the router."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    slo: SLO
    arrival: float
    tried: set[str] = field(default_factory=set)  # workers of failed hand-off attempts: asked last


@dataclass
class HandedOff:
    """A successful hand-off: the decode visit holding the prompt's KV, and the first token."""

    decode: Visit
    decode_params: SamplingParams  # the request's parameters there (with its starting k)
    prefill_id: str
    result: PrefillResult
    queue_s: float
    attempt: int


class Handoff:
    def __init__(self, view: ClusterView, speculation: Speculation, block_size: int, attempts: int):
        if attempts < 1:
            raise ValueError(f"handoff_attempts must be >= 1, got {attempts}")
        self.view, self.speculation, self.block_size, self.attempts = view, speculation, block_size, attempts
        self.num_retries = 0

    async def run(self, req: RoutedRequest, prefill_id: str, decode_id: str,
                  chunk_tokens: int | None = None) -> HandedOff:
        """Attempts until one hands the prompt's KV to a decode worker; ServingError when all fail.
        The first tries the placed pair (either may have changed pool since: every worker can do
        both), its prefill in chunks of ``chunk_tokens`` (placement's, where the prefill worker
        decodes too); later ones rank the pools again, avoiding the workers that failed."""
        failures: list[str] = []
        for attempt in range(1, self.attempts + 1):
            try:
                placed = (prefill_id, decode_id) if attempt == 1 else None
                return await self._attempt(req, attempt, placed, chunk_tokens if attempt == 1 else None)
            except HandoffFailed as e:
                failures.append(str(e))
                self.num_retries += 1
                logger.warning("request %s: handoff attempt %d failed: %s", req.request_id, attempt, e)
        raise ServingError(f"request {req.request_id}: KV handoff failed {self.attempts} times: {failures[-1]}")

    async def _attempt(self, req: RoutedRequest, attempt: int, placed: tuple[str, str] | None,
                       chunk_tokens: int | None) -> HandedOff:
        """Reserve on a decode worker, prefill into it; HandoffFailed (reservation released)
        when the transfer or a worker failed, CapacityError when no worker can take it."""
        cached = {} if placed is not None else await self._cached_blocks(req)  # the placed pair is ranked already
        decode, decode_params, destination = await self._reserve(req, None if placed is None else placed[1], cached)
        renewing = asyncio.create_task(self._renew(req.request_id, decode, destination.lease_s))
        try:
            prefill_id = placed[0] if placed is not None else self._choose_prefill(req, cached)
            queue_s = time.monotonic() - req.arrival
            result = await self._prefill(req, prefill_id, destination, decode.worker_id, chunk_tokens)
        except BaseException:
            await decode.leave()  # releases the reservation
            raise
        finally:
            renewing.cancel()
        return HandedOff(decode, decode_params, prefill_id, result, queue_s, attempt)

    async def _renew(self, request_id: str, decode: Visit, lease_s: float) -> None:
        """Renew the reservation every third of its lease while the prompt is prefilled (it
        lapses, freeing the blocks, if this router dies)."""
        if lease_s <= 0:
            return
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                renewed = await self.view.call(decode.handle.renew_reservation.remote(request_id), decode.worker_id)
            except ServingError as e:  # the decode worker is gone: the transfer to it fails too
                logger.warning("request %s: cannot renew its reservation on %s: %s", request_id, decode.worker_id, e)
                return
            if not renewed:
                logger.warning("request %s: its reservation on %s lapsed", request_id, decode.worker_id)
                return

    async def _prefill(self, req: RoutedRequest, prefill_id: str, destination: KVDestination,
                       decode_id: str, chunk_tokens: int | None) -> PrefillResult:
        params = dataclasses.replace(req.params, num_speculative_tokens=None)  # it samples one token
        prefill = Visit(self.view, prefill_id, self.view.handle(prefill_id), req.request_id)
        try:
            result = await self.view.call(
                prefill.handle.prefill.remote(req.request_id, req.prompt_ids, params, destination, chunk_tokens),
                prefill_id)
            prefill.finished = True  # the request left the prefill worker
            return result
        except ServingError as e:
            req.tried |= {decode_id, prefill_id}
            raise HandoffFailed(str(e)) from None
        finally:
            await prefill.leave()

    async def _cached_blocks(self, req: RoutedRequest) -> dict[str, int]:
        """The prompt's blocks each worker holds in its prefix cache (one store read)."""
        hashes = prompt_block_hashes(req.prompt_ids, self.block_size)
        return await asyncio.to_thread(self.view.store.match_prefix, hashes) if hashes else {}

    def _choose_prefill(self, req: RoutedRequest, cached: dict[str, int]) -> str:
        """The prefill worker with the lowest predicted TTFT (prefix-cache hits included)."""
        ids = self.view.ids("prefill")
        models = {w: m for w in ids if (m := self.view.models_of(w).prefill) is not None}
        ranked = rank_prefill(ids, len(req.prompt_ids), cached, self.block_size, self.view.loads,
                              self.view.inflight_tokens, models, req.tried)
        return ranked[0].worker_id

    async def _reserve(self, req: RoutedRequest, preferred: str | None,
                       cached: dict[str, int]) -> tuple[Visit, SamplingParams, KVDestination]:
        """Blocks for the prompt on the ``preferred`` decode worker, else the best one that has
        room (``cached``: the prompt's blocks per worker): its visit, the request's parameters
        there and the KV destination."""
        ids = self.view.members("decode")
        models = {w: m for w in ids if (m := self.view.models_of(w).decode_step) is not None}
        ranked = rank_decode(ids, len(req.prompt_ids), self.block_size, self.view.loads, self.view.inflight,
                             models, req.tried, cached=cached)
        order = [c.worker_id for c in ranked if c.worker_id != preferred]
        if preferred is not None:
            order.insert(0, preferred)
        if not order:
            raise ServingError("no live decode worker")
        errors: list[str] = []
        gone: list[WorkerGone] = []
        for worker_id in order:
            params = self.speculation.start_params(worker_id, req.request_id, len(req.prompt_ids), req.params)
            try:
                handle = self.view.handle(worker_id)
                destination = await self.view.call(handle.reserve.remote(req.request_id, req.prompt_ids, params),
                                                   worker_id)
            except WorkerGone as e:  # dead: the next one may do
                gone.append(e)
                continue
            except (CapacityError, ServingError) as e:  # full, or failing: the next one may do
                errors.append(str(e))
                continue
            return Visit(self.view, worker_id, handle, req.request_id), params, destination
        if gone and not errors:  # every decode worker asked is dead: the request is placed anew
            raise gone[-1]
        raise CapacityError(no_worker("decode", errors + [str(e) for e in gone]))
