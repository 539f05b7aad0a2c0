"""Router: turns a GenerateInput into tokens streamed from the workers (the ``Frontend``).

It takes the request in (tokenizing, applying the chat template for messages, defaulting the
SLO), then, disaggregated, has the ``Handoff`` part put its prompt's KV on a decode worker and
get its first token (sent to the client at once: TTFT; placement, admission and retries are
the Handoff's), and streams the rest from that worker's ``generate_from``. Colocated, one
worker's ``generate`` does everything. The ``Speculation`` part picks each request's k and
pushes changes to the decode worker; the ``ClusterView`` holds what the router knows of the
workers. Every worker a request visits counts it in flight (``Visit``) until it leaves;
leaving before the worker finished it (client cancel, error) aborts it there, which frees its
blocks. The last delta carries the request's ``RequestReport``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import ray

from splitserve.cluster import RAY_NAMESPACE
from splitserve.cluster.store import MetadataStore
from splitserve.engine.tokenizer import Tokenizer
from splitserve.errors import CapacityError, ServingError
from splitserve.protocol import SLO, GenerateDelta, RequestReport
from splitserve.router.api import GenerateInput
from splitserve.router.cluster_view import ClusterView
from splitserve.router.handoff import Handoff, RoutedRequest
from splitserve.router.speculation import Speculation
from splitserve.router.worker_calls import Visit, call, no_worker

logger = logging.getLogger(__name__)


class Router:
    """The Frontend over the workers listed in ``store``.

    model_path: the served model file or folder (its stem is the model name clients may use).
    workers_ttl_s: how long a read of the store's membership, loads and models is reused.
    """

    def __init__(
        self,
        store: MetadataStore,
        tokenizer: Tokenizer,
        model_path: str | Path,
        *,
        mode: str = "disaggregated",
        handoff_attempts: int = 3,
        workers_ttl_s: float = 0.2,
        get_actor: Callable[[str], Any] | None = None,
        block_size: int = 16,
        metrics: Any = None,
        spec_interval_s: float = 0.25,
        default_slo: SLO | None = None,
    ):
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
        self._ids = itertools.count()
        self._closing = False
        self._active: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None

    # ---------------------------------------------------------------------- Frontend API

    @property
    def model_name(self) -> str:
        return min(self._model_names, key=len)

    def is_ready(self) -> bool:
        needed = {"colocated"} if self.mode == "colocated" else {"prefill", "decode"}
        return not self._closing and self.view.has_kinds(needed)

    async def refresh(self, force: bool = False) -> None:
        """Read membership, loads and models from the store (at most every ``workers_ttl_s``)."""
        await self.view.refresh(force)
        if self.metrics is not None:
            for worker_id, load in self.view.loads.items():
                self.metrics.set_worker_blocks(worker_id, load.num_total_blocks - load.num_free_blocks,
                                               load.num_total_blocks)

    def start(self, interval_s: float = 1.0) -> None:
        """Keep membership fresh in the background, so health follows the workers (call on the
        event loop that serves requests)."""

        async def poll() -> None:
            while True:
                try:
                    await self.refresh(force=True)
                except Exception:  # the store is unreachable: keep the last view, retry
                    logger.warning("router: cannot read the store", exc_info=True)
                await asyncio.sleep(interval_s)

        self._poller = asyncio.create_task(poll())

    async def close(self, grace_s: float = 30.0) -> None:
        """Refuse new requests; give in-flight ones ``grace_s`` to finish, then cancel them
        (which aborts them on the workers)."""
        self._closing = True
        if self._poller is not None:
            self._poller.cancel()
        if self._active:
            _, pending = await asyncio.wait(set(self._active), timeout=grace_s)
            for task in pending:
                task.cancel()

    async def generate(self, request: GenerateInput) -> AsyncIterator[GenerateDelta]:
        if self._closing:
            raise ServingError("the server is shutting down")
        req = self._accept(request)
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
        try:
            await self.refresh()
            stream = self._colocated(req) if self.mode == "colocated" else self._disaggregated(req)
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    yield delta
        finally:
            self.speculation.forget(req.request_id)
            if task is not None:
                self._active.discard(task)

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

    # ------------------------------------------------------------------------ colocated

    async def _colocated(self, req: RoutedRequest) -> AsyncIterator[GenerateDelta]:
        errors: list[str] = []
        for worker_id in self.view.least_loaded("colocated"):
            visit = Visit(self.view, worker_id, self.view.handle(worker_id), req.request_id)
            try:
                params = self.speculation.start_params(worker_id, req.request_id, len(req.prompt_ids), req.params)
                stream = visit.handle.generate.remote(req.request_id, req.prompt_ids, params)
                self.speculation.track(worker_id, req.request_id, len(req.prompt_ids), req.params, params)
                first_at = None
                async for ref in stream:
                    delta = await call(ref, worker_id)
                    visit.finished = delta.finished
                    first_at = first_at or time.monotonic()
                    self.speculation.observe(worker_id, visit.handle, delta)
                    if delta.finished:
                        delta = dataclasses.replace(delta, report=self._report(
                            req, delta, decode_worker=worker_id, prefill_s=first_at - req.arrival,
                            decode_s=time.monotonic() - first_at))
                    yield delta
                return
            except CapacityError as e:
                errors.append(str(e))
            finally:
                self.speculation.untrack(worker_id, req.request_id)
                await visit.leave()
        raise CapacityError(no_worker("colocated", errors))

    # -------------------------------------------------------------------- disaggregated

    async def _disaggregated(self, req: RoutedRequest) -> AsyncIterator[GenerateDelta]:
        handoff = await self.handoff.run(req)
        decode, result = handoff.decode, handoff.result
        try:
            first_at = time.monotonic()

            def finished(delta: GenerateDelta) -> GenerateDelta:
                return dataclasses.replace(delta, report=self._report(
                    req, delta, prefill_worker=handoff.prefill_id, decode_worker=decode.worker_id,
                    queue_s=handoff.queue_s, prefill_s=result.prefill_s, transfer_s=result.handoff_wait_s,
                    decode_s=time.monotonic() - first_at, handoff_attempts=handoff.attempt))

            first = GenerateDelta(req.request_id, [result.first_token_id], result.text, result.finished,
                                  result.finish_reason, num_prompt_tokens=result.num_prompt_tokens, num_output_tokens=1)
            if result.finished:
                yield finished(first)  # on leaving, the reservation is released
                return
            yield first
            if self.metrics is not None:
                self.metrics.observe_transfer(result.num_kv_bytes, result.handoff_wait_s)
            self.speculation.track(decode.worker_id, req.request_id, len(req.prompt_ids), req.params,
                                   handoff.decode_params)
            stream = decode.handle.generate_from.remote(req.request_id, result.first_token_id, result.generator_state)
            async for ref in stream:
                delta = await call(ref, decode.worker_id)
                decode.finished = delta.finished
                self.speculation.observe(decode.worker_id, decode.handle, delta)
                yield finished(delta) if delta.finished else delta
        finally:
            self.speculation.untrack(decode.worker_id, req.request_id)
            await decode.leave()

    def _report(self, req: RoutedRequest, last: GenerateDelta, **phases: Any) -> RequestReport:
        return RequestReport(k_history=self.speculation.k_history(req.request_id),
                             num_draft_tokens=last.num_draft_tokens, num_accepted_tokens=last.num_accepted_tokens,
                             **phases)
