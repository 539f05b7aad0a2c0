"""Router: turns a GenerateInput into tokens streamed from the workers (the ``Frontend``).

It takes the request in (tokenizing, applying the chat template for messages, defaulting the
SLO), then the ``Placer`` part decides where its prefill runs and whether it is admitted at
all (elastic mode: remote or local, from latency predictions against the request's SLO;
disaggregated: always remote). Remote, the ``Handoff`` part puts its prompt's KV on a decode
worker and gets its first token (sent to the client at once: TTFT; retries are the Handoff's),
and the rest streams from that worker's ``generate_from``. Local -- and in colocated mode,
on the least loaded worker -- one worker's ``generate`` does everything, its prefill chunked
into the decode batch. The ``Speculation`` part picks each request's k and pushes changes to
the decode worker; the ``ClusterView`` holds what the router knows of the workers. Every
worker a request visits counts it in flight (``Visit``) until it leaves; leaving before the
worker finished it (client cancel, error) aborts it there, which frees its blocks. The last
delta carries the request's ``RequestReport`` (the placement, what was predicted and what was
observed).

Migration: when the worker a request streams from dies or cannot be reached (``WorkerGone``,
the ClusterView's first sign, which also takes the worker out of the pools at once), the
request continues on the least loaded live worker: it prefills the prompt and the tokens the
client got into its batch and decodes on, a seeded request's sampler state restored (every
delta carries it), so the client sees one stream with no token repeated or missing. At most
``migration_limit`` moves per request; before its first token a request is simply placed anew.
A worker that ends a stream the router did not end -- it gave the request up ("abort": it is
stopping, or it stopped hearing this router's lease) or its stream stopped short -- is treated
the same way (``_stream_ended``): the request moves on rather than end short of its tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from splitserve.cluster import RAY_NAMESPACE
from splitserve.cluster.store import MetadataStore, StoreConnectionError
from splitserve.config import MODES, WORKER_KINDS, PlacementConfig, RoleConfig
from splitserve.engine.continuation import Continuation
from splitserve.engine.tokenizer import Tokenizer
from splitserve.errors import CapacityError, ServingError, StreamLost, WorkerGone
from splitserve.protocol import SLO, GenerateDelta, RequestReport
from splitserve.router.api import GenerateInput
from splitserve.router.cluster_view import ClusterView
from splitserve.router.handoff import Handoff, RoutedRequest
from splitserve.router.placer import Placer
from splitserve.router.prefill_placement import LOCAL, Placement
from splitserve.router.roles import RoleBalancer, RoleStats
from splitserve.router.speculation import Speculation
from splitserve.router.worker_calls import OwnerLease, Visit, no_worker, watched

logger = logging.getLogger(__name__)
_ABORTED = "abort"  # the finish_reason of a request its worker gave up
_TTFT_WEIGHT = 0.1  # how fast the mean time to first token (a full queue's retry hint) follows new requests


class Router:
    """The Frontend over the workers listed in ``store``.

    model_path: the served model file or folder (its stem is the model name clients may use).
    workers_ttl_s: how long a read of the store's membership, loads and models is reused.
    migration_limit: how many times a request may move to another worker when the one running
    it dies (0: never; it fails with UNAVAILABLE). max_queued_requests: how many requests may
    wait for their first token at once; one more is refused at once (RESOURCE_EXHAUSTED / 429,
    retry hint: the recent mean TTFT) rather than queued (None: no bound). stream_lease_s: how
    long a worker streaming a request of this router's keeps it without hearing from the router
    (``OwnerLease``; renewed every third of it): a router that died leaves no request decoding.
    stream_check_s: how long a worker's stream may stay silent before the router asks the
    worker whether it still holds the request (``watched``: one that no longer does lost the
    stream's end, and the request moves on as from a dead worker).
    """

    def __init__(
        self,
        store: MetadataStore,
        tokenizer: Tokenizer,
        model_path: str | Path,
        *,
        mode: str = "elastic",
        handoff_attempts: int = 3,
        workers_ttl_s: float = 0.2,
        get_actor: Callable[[str], Any] | None = None,
        block_size: int = 16,
        metrics: Any = None,
        spec_interval_s: float = 0.25,
        default_slo: SLO | None = None,
        placement: PlacementConfig | None = None,
        roles: RoleConfig | None = None,
        migration_limit: int = 3,
        max_queued_requests: int | None = None,
        stream_lease_s: float = 10.0,
        stream_check_s: float = 20.0,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {migration_limit}")
        if max_queued_requests is not None and max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0 or None, got {max_queued_requests}")
        if not 0 < stream_check_s < math.inf:
            raise ValueError(f"stream_check_s must be positive and finite, got {stream_check_s}")
        self.migration_limit, self.max_queued_requests = migration_limit, max_queued_requests
        self.stream_check_s = stream_check_s
        self._num_waiting = self._num_running = 0
        self._ttft_s = 1.0  # a running mean of the time to first token: the retry hint of a full queue
        self.tokenizer = tokenizer
        self.mode = mode
        self._model_names = {Path(model_path).stem, Path(model_path).name}
        self.view = ClusterView(store, get_actor or (lambda name: ray.get_actor(name, namespace=RAY_NAMESPACE)),
                                workers_ttl_s)
        self.block_size = block_size
        self.default_slo = default_slo or SLO()
        self.metrics = metrics
        self.speculation = Speculation(self.view, spec_interval_s, metrics)
        self.handoff = Handoff(self.view, self.speculation, block_size, handoff_attempts)
        self.owner = OwnerLease(self.view, stream_lease_s)
        self.placer = Placer(self.view, self.speculation.controller, block_size, placement or PlacementConfig(),
                             self.default_slo)
        self.role_stats = RoleStats()
        # Only the router of the deployment moves its workers (replicas pass no RoleConfig).
        self.roles = RoleBalancer(self.view, self.role_stats, roles, metrics) \
            if roles is not None and roles.enabled and mode == "elastic" else None
        self._ids = itertools.count()
        self._closing = False
        self._store_error: str | None = None  # why the last store read failed, while it does
        self._active: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None
        self._balancer: asyncio.Task | None = None

    # ---------------------------------------------------------------------- Frontend API

    @property
    def model_name(self) -> str:
        return min(self._model_names, key=len)

    def is_ready(self) -> bool:
        """Whether requests can be served: the store answered the last read, and there is any
        live worker in elastic mode (every worker can run a request end to end), both pools in
        disaggregated mode."""
        if self._closing or self._store_error is not None:
            return False
        if self.mode == "elastic":
            return bool(self.view.workers)
        return self.view.has_kinds({"colocated": {"colocated"}, "disaggregated": {"prefill", "decode"}}[self.mode])

    async def refresh(self, force: bool = False) -> None:
        """Read membership, loads and models from the store (at most every ``workers_ttl_s``);
        StoreConnectionError (UNAVAILABLE) while the store cannot be read, and health says so."""
        try:
            await self.view.refresh(force)
        except StoreConnectionError as e:
            if self._store_error is None:
                logger.warning("router: the store cannot be read (%s); not serving until it can", e)
            self._store_error = str(e)
            raise
        if self._store_error is not None:
            logger.info("router: the store answers again")
            self._store_error = None
        if self.metrics is not None:
            for worker_id, load in self.view.loads.items():
                self.metrics.set_worker_blocks(worker_id, load.num_total_blocks - load.num_free_blocks,
                                               load.num_total_blocks)
            self.metrics.set_pools({role: len(self.view.members(role)) for role in WORKER_KINDS})

    def start(self, interval_s: float = 1.0) -> None:
        """Keep membership fresh in the background, so health follows the workers (call on the
        event loop that serves requests)."""

        async def poll() -> None:
            while True:
                try:
                    await self.refresh(force=True)
                except StoreConnectionError:  # said once by refresh; health is NOT_SERVING meanwhile
                    pass
                except Exception:  # keep the last view, retry
                    logger.warning("router: cannot read the store", exc_info=True)
                await asyncio.sleep(interval_s)

        self._poller = asyncio.create_task(poll())
        if self.roles is not None:
            self._balancer = asyncio.create_task(self.roles.run())

    async def close(self, grace_s: float = 30.0) -> None:
        """Refuse new requests; give in-flight ones ``grace_s`` to finish, then cancel them
        (which aborts them on the workers)."""
        self._closing = True
        for task in (self._poller, self._balancer):
            if task is not None:
                task.cancel()
        if self._active:
            _, pending = await asyncio.wait(set(self._active), timeout=grace_s)
            for task in pending:
                task.cancel()
        self.owner.stop()

    async def generate(self, request: GenerateInput) -> AsyncIterator[GenerateDelta]:
        if self._closing:
            raise ServingError("the server is shutting down")
        if self._store_error is not None:  # (the background poll clears it once a read succeeds)
            raise ServingError(f"the cluster's store cannot be read ({self._store_error}); retry later")
        req = self._accept(request)
        if self.max_queued_requests is not None and self._num_waiting >= self.max_queued_requests:
            raise CapacityError(f"{self._num_waiting} requests are waiting for their first token, the most this "
                                f"server queues (max_queued_requests); retry later", retry_after_s=self._ttft_s)
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
        phase = self._count("waiting", +1)
        try:
            await self.refresh()
            stream = self._migrating(req)
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    if phase == "waiting":
                        self._ttft_s += _TTFT_WEIGHT * (time.monotonic() - req.arrival - self._ttft_s)
                        self._count("waiting", -1)
                        phase = self._count("running", +1)
                    yield delta
        finally:
            self._count(phase, -1)
            self.speculation.forget(req.request_id)
            self.placer.forget(req.request_id)
            if task is not None:
                self._active.discard(task)

    def _count(self, phase: str, change: int) -> str:
        """Count a request into (or out of) the requests waiting for their first token or
        running; the phase."""
        if phase == "waiting":
            self._num_waiting += change
        else:
            self._num_running += change
        if self.metrics is not None:
            self.metrics.set_queue(self._num_running, self._num_waiting)
        return phase

    # -------------------------------------------------------------------------- intake

    def _accept(self, request: GenerateInput) -> RoutedRequest:
        """The request with its prompt tokenized and its SLO defaulted; ValueError if bad."""
        arrival = time.monotonic()
        prompt_ids = self._prompt_token_ids(request)
        slo = SLO(request.slo.ttft_s if request.slo.ttft_s is not None else self.default_slo.ttft_s,
                  request.slo.tpot_s if request.slo.tpot_s is not None else self.default_slo.tpot_s)
        request_id = request.request_id or f"{uuid.uuid4().hex[:12]}-{next(self._ids)}"
        return RoutedRequest(request_id, prompt_ids, request.params, slo, arrival)

    def _prompt_token_ids(self, request: GenerateInput) -> list[int]:
        if request.model and request.model not in self._model_names:
            raise ValueError(f"unknown model {request.model!r}; this server serves {self.model_name!r}")
        given = [request.prompt is not None, request.prompt_token_ids is not None, request.messages is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, prompt_token_ids or messages")
        if request.messages is not None:
            text = self.tokenizer.apply_chat_template(request.messages)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if request.prompt is not None:
            if not request.prompt:
                raise ValueError("prompt must not be empty")
            return self.tokenizer.encode(request.prompt)
        return list(request.prompt_token_ids or [])  # the worker checks them against the vocabulary

    # ------------------------------------------------------------------------ migration

    async def _migrating(self, req: RoutedRequest) -> AsyncIterator[GenerateDelta]:
        """The request's deltas; when the worker running it dies or cannot be reached
        (WorkerGone), it continues on another worker from what the client got so far, up to
        ``migration_limit`` times (then ServingError, a sentence saying so). A worker that dies
        after the request's last delta went out leaves it finished: nothing is left to move."""
        sent = _Sent()
        while True:
            if not sent.token_ids:
                stream = self._colocated(req) if self.mode == "colocated" else self._placed(req)
            else:
                stream = self._continued(req, sent)
            try:
                async with contextlib.aclosing(stream):
                    async for delta in stream:
                        yield sent.add(delta, req.arrival)
                return
            except WorkerGone as e:
                if isinstance(e, StreamLost) and self.metrics is not None:
                    self.metrics.count_lost_stream()
                if sent.finished:  # it died after the last delta went out: nothing is left to move
                    logger.info("request %s: %s after it finished", req.request_id, e)
                    return
                if sent.num_migrations >= self.migration_limit:
                    raise ServingError(f"request {req.request_id}: {e}; it moved {sent.num_migrations} times "
                                       f"already (migration limit {self.migration_limit})") from None
                sent.num_migrations += 1
                req.tried.add(e.worker_id)
                logger.warning("request %s: %s; continuing elsewhere from its %d tokens (migration %d of at most "
                               "%d)", req.request_id, e, len(sent.token_ids), sent.num_migrations,
                               self.migration_limit)
                if self.metrics is not None:
                    self.metrics.count_migration()

    async def _continued(self, req: RoutedRequest, sent: _Sent) -> AsyncIterator[GenerateDelta]:
        """The request on another worker, from the tokens its client got: that worker prefills
        the prompt and those tokens into its own batch and decodes on (a continued request runs
        on one worker in every mode: the hand-off carries prompts, not what was generated)."""
        await self.refresh(force=True)
        kinds = ("colocated",) if self.mode == "colocated" else ("decode", "prefill")
        live = [w for kind in kinds for w in self.view.by_load(self.view.members(kind))]
        candidates = [w for w in live if w not in req.tried] or live
        if not candidates:
            raise ServingError(f"request {req.request_id}: no live worker to continue it on")
        stream = self._on_first_with_room(req, candidates, "live", sent.continuation())
        async with contextlib.aclosing(stream):
            async for delta in stream:
                yield delta

    # ------------------------------------------------------------------------ colocated

    def _colocated(self, req: RoutedRequest) -> AsyncIterator[GenerateDelta]:
        return self._on_first_with_room(req, self.view.least_loaded("colocated"), "colocated")

    async def _on_first_with_room(self, req: RoutedRequest, worker_ids: list[str], what: str,
                                  continuation: Continuation | None = None) -> AsyncIterator[GenerateDelta]:
        """The request end to end on the first of ``worker_ids`` with room for it: a full one
        answers CapacityError before its first delta, and the next is asked."""
        errors: list[str] = []
        for worker_id in worker_ids:
            stream = self._end_to_end(req, worker_id, continuation=continuation)
            try:
                first = await anext(stream)
            except CapacityError as e:
                errors.append(str(e))
                continue
            async with contextlib.aclosing(stream):
                yield first
                async for delta in stream:
                    yield delta
            return
        raise CapacityError(no_worker(what, errors))

    # --------------------------------------------------------- elastic and disaggregated

    async def _placed(self, req: RoutedRequest) -> AsyncIterator[GenerateDelta]:
        """Place the prefill (elastic: remote or local; disaggregated: remote), then run it."""
        placement = await self.placer.place(req, local=self.mode == "elastic")
        if self.metrics is not None:
            self.metrics.count_placement(placement.kind)
        if placement.kind == LOCAL:
            stream = self._end_to_end(req, placement.decode_worker, placement)
        else:
            stream = self._remote(req, placement)
        async with contextlib.aclosing(stream):
            async for delta in stream:
                yield delta

    async def _end_to_end(self, req: RoutedRequest, worker_id: str, placement: Placement | None = None,
                          continuation: Continuation | None = None) -> AsyncIterator[GenerateDelta]:
        """The request on one worker from its prompt (a local placement, colocated, or a
        ``continuation`` of what it produced on a worker that died). Its prompt counts as
        queued prefill there (from the placement, or from here) until the first token."""
        if placement is None:
            self.view.inflight_tokens[worker_id] += len(req.prompt_ids)
        started = time.monotonic()
        visit = Visit(self.view, worker_id, self.view.handle(worker_id), req.request_id)
        first_at = None
        try:
            params = self.speculation.start_params(worker_id, req.request_id, len(req.prompt_ids), req.params)
            chunk = None if placement is None else placement.chunk_tokens
            if placement is not None and placement.draft_ks:
                self.speculation.hold(worker_id, visit.handle, req.request_id, dict(placement.draft_ks))
            stream = visit.handle.generate.remote(req.request_id, req.prompt_ids, params, chunk, continuation,
                                                 self.owner.hold())
            self.speculation.track(worker_id, req.request_id, len(req.prompt_ids), req.params, params)
            async with contextlib.aclosing(self._watched(stream, worker_id, visit.handle, req.request_id)) as deltas:
                async for delta in deltas:
                    visit.finished = delta.finished
                    if delta.finish_reason == _ABORTED:
                        if delta.token_ids:
                            yield dataclasses.replace(delta, finished=False, finish_reason=None)
                        raise self._stream_ended(worker_id, req.request_id)
                    if first_at is None:
                        first_at = time.monotonic()
                        self._prefilled(req, worker_id)
                        self.speculation.release(worker_id, req.request_id)
                        self.placer.decoding(worker_id, req.request_id, req.slo, req.params)
                    self.placer.streamed(worker_id, req.request_id, delta.num_output_tokens)
                    self.speculation.observe(worker_id, visit.handle, delta)
                    if delta.finished:
                        delta = dataclasses.replace(delta, report=self._report(
                            req, delta, placement, started, first_at, decode_worker=worker_id,
                            prefill_worker=worker_id if placement is not None else "", prefill_s=first_at - req.arrival,
                            decode_s=time.monotonic() - first_at))
                    yield delta
            if not visit.finished:
                raise self._stream_ended(worker_id, req.request_id)
        finally:
            if first_at is None:
                self._prefilled(req, worker_id)
                self.speculation.release(worker_id, req.request_id)
            self.placer.done(worker_id, req.request_id)
            self.speculation.untrack(worker_id, req.request_id)
            await visit.leave()

    async def _remote(self, req: RoutedRequest, placement: Placement) -> AsyncIterator[GenerateDelta]:
        """Prefill on a prefill-pool worker into a decode worker's reservation (the Handoff),
        then stream the rest from that decode worker."""
        started = time.monotonic()
        try:
            handoff = await self.handoff.run(req, placement.prefill_worker, placement.decode_worker,
                                             placement.chunk_tokens)
        finally:
            self._prefilled(req, placement.prefill_worker)
        decode, result = handoff.decode, handoff.result
        try:
            first_at = time.monotonic()
            self.placer.observe_transfer(result.handoff_wait_s)
            self.placer.decoding(decode.worker_id, req.request_id, req.slo, req.params)

            def finished(delta: GenerateDelta) -> GenerateDelta:
                return dataclasses.replace(delta, report=self._report(
                    req, delta, placement, started, first_at, prefill_worker=handoff.prefill_id,
                    decode_worker=decode.worker_id, queue_s=handoff.queue_s, prefill_s=result.prefill_s,
                    transfer_s=result.handoff_wait_s, decode_s=time.monotonic() - first_at,
                    handoff_attempts=handoff.attempt))

            first = GenerateDelta(req.request_id, [result.first_token_id], result.text, result.finished,
                                  result.finish_reason, num_prompt_tokens=result.num_prompt_tokens, num_output_tokens=1,
                                  generator_state=result.generator_state)
            if result.finished:
                yield finished(first)  # on leaving, the reservation is released
                return
            yield first
            if self.metrics is not None:
                self.metrics.observe_transfer(result.num_kv_bytes, result.handoff_wait_s)
            self.speculation.track(decode.worker_id, req.request_id, len(req.prompt_ids), req.params,
                                   handoff.decode_params)
            stream = decode.handle.generate_from.remote(req.request_id, result.first_token_id, result.generator_state,
                                                        self.owner.hold())
            watch = self._watched(stream, decode.worker_id, decode.handle, req.request_id)
            async with contextlib.aclosing(watch) as deltas:
                async for delta in deltas:
                    decode.finished = delta.finished
                    if delta.finish_reason == _ABORTED:
                        if delta.token_ids:
                            yield dataclasses.replace(delta, finished=False, finish_reason=None)
                        raise self._stream_ended(decode.worker_id, req.request_id)
                    self.placer.streamed(decode.worker_id, req.request_id, delta.num_output_tokens)
                    self.speculation.observe(decode.worker_id, decode.handle, delta)
                    yield finished(delta) if delta.finished else delta
            if not decode.finished:
                raise self._stream_ended(decode.worker_id, req.request_id)
        finally:
            self.placer.done(decode.worker_id, req.request_id)
            self.speculation.untrack(decode.worker_id, req.request_id)
            await decode.leave()

    def _watched(self, stream: Any, worker_id: str, handle: Any, request_id: str) -> AsyncIterator[GenerateDelta]:
        """The deltas of a worker's stream (Ray's generator of refs), watched for a lost end."""

        async def deltas() -> AsyncIterator[GenerateDelta]:
            async for ref in stream:
                yield await self.view.call(ref, worker_id)

        async def holds() -> bool:
            return await self.view.call(handle.holds.remote(request_id), worker_id)

        return watched(deltas(), holds, self.stream_check_s, worker_id, request_id)

    def _stream_ended(self, worker_id: str, request_id: str) -> WorkerGone:
        """A worker ended ``request_id``'s stream unfinished, unasked: it is stopping (or lost
        this router's lease), so it leaves the pools as an unreachable worker does and the
        request moves (the module docstring)."""
        self.view.gone(worker_id, dead=False)
        return WorkerGone(worker_id, f"worker {worker_id} ended request {request_id}'s stream before it finished")

    def _prefilled(self, req: RoutedRequest, worker_id: str) -> None:
        """The prompt is no longer queued for prefill at the worker."""
        self.view.inflight_tokens[worker_id] -= len(req.prompt_ids)

    def _report(self, req: RoutedRequest, last: GenerateDelta, placement: Placement | None, started: float,
                first_at: float, **phases: Any) -> RequestReport:
        """The finished request's report; a placed request's observed latencies also correct
        its workers' predictions and land in the metrics."""
        now = time.monotonic()
        ttft = first_at - started
        tpot = (now - first_at) / (last.num_output_tokens - 1) if last.num_output_tokens > 1 else None
        placed: dict[str, Any] = {"ttft_s": ttft, "tpot_s": tpot or 0.0}
        if placement is not None:
            prefill_model = self.view.models_of(placement.prefill_worker).prefill
            if prefill_model is not None:
                self.role_stats.observe(prefill_model.predict(len(req.prompt_ids)), last.num_output_tokens)
            ratios = self.placer.observe(placement, ttft, tpot)
            if self.metrics is not None:
                self.metrics.observe_prediction(placement.kind, *ratios)
            placed |= {"placement": placement.kind, "predicted_ttft_s": _finite(placement.predicted_ttft_s),
                       "predicted_tpot_s": _finite(placement.predicted_tpot_s)}
        return RequestReport(k_history=self.speculation.k_history(req.request_id),
                             num_draft_tokens=last.num_draft_tokens, num_accepted_tokens=last.num_accepted_tokens,
                             **placed, **phases)


def _finite(seconds: float) -> float:
    return seconds if math.isfinite(seconds) else 0.0


@dataclass
class _Sent:
    """What a request's client got so far: enough to continue it on another worker."""

    token_ids: list[int] = field(default_factory=list)
    num_chars: int = 0
    generator_state: bytes | None = None
    first_at: float | None = None
    num_migrations: int = 0
    finished: bool = False

    def add(self, delta: GenerateDelta, arrival: float) -> GenerateDelta:
        """Count ``delta`` as sent; the delta to send (a migrated request's report made whole:
        TTFT from its arrival, TPOT over all its tokens, the migrations)."""
        now = time.monotonic()
        self.first_at = self.first_at or now
        self.token_ids += delta.token_ids
        self.num_chars += len(delta.text)
        self.generator_state = delta.generator_state or self.generator_state
        self.finished = delta.finished
        if delta.report is None or not self.num_migrations:
            return delta
        tpot = (now - self.first_at) / (len(self.token_ids) - 1) if len(self.token_ids) > 1 else 0.0
        return dataclasses.replace(delta, report=dataclasses.replace(
            delta.report, ttft_s=self.first_at - arrival, tpot_s=tpot, migrations=self.num_migrations))

    def continuation(self) -> Continuation:
        return Continuation(tuple(self.token_ids), self.num_chars, self.generator_state)
