"""Router: turns a GenerateInput into tokens streamed from the workers (the ``Frontend``).

It tokenizes (applying the chat template for messages), then, disaggregated:

1. picks a decode worker and asks it to ``reserve`` blocks for the prompt; a worker without
   room answers CapacityError and the next one is asked;
2. picks a prefill worker and asks it to ``prefill`` into that reservation; the result is the
   first token (sent to the client at once: TTFT) and means every KV chunk landed;
3. streams the rest from the decode worker's ``generate``.

A failed handoff (TransferError, a dead worker) releases the reservation and retries, up to
``handoff_attempts`` times, preferring other workers. Colocated, one worker's ``generate``
does everything. Worker choice here is least-loaded (live workers from the MetadataStore,
ranked by what this router has in flight on each, then by their reported load); the
goodput-aware policy replaces ``_rank``.

Leaving the iterator early (client cancel) aborts the request on every worker it touched,
which frees its blocks there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from splitserve.cluster.deployment import RAY_NAMESPACE
from splitserve.cluster.store import MetadataStore, WorkerInfo, WorkerLoad
from splitserve.engine.tokenizer import Tokenizer
from splitserve.errors import CapacityError, ServingError
from splitserve.router.api import SLO, GenerateDelta, GenerateInput, RequestReport
from splitserve.router.placement import Choice, check_slo, prompt_block_hashes, rank_decode, rank_prefill
from splitserve.router.spec_control import SpecController

logger = logging.getLogger(__name__)


class Router:
    """The Frontend over the workers listed in ``store``.

    model_path: the served model file or folder (its stem is the model name clients may use).
    workers_ttl_s: how long a read of the store's membership and loads is reused.
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
        if handoff_attempts < 1:
            raise ValueError(f"handoff_attempts must be >= 1, got {handoff_attempts}")
        self.store = store
        self.tokenizer = tokenizer
        self.mode = mode
        self.handoff_attempts = handoff_attempts
        self._model_names = {Path(model_path).stem, Path(model_path).name}
        self._workers_ttl_s = workers_ttl_s
        self._get_actor = get_actor or (lambda name: ray.get_actor(name, namespace=RAY_NAMESPACE))
        self._handles: dict[str, Any] = {}
        self._workers: list[WorkerInfo] = []
        self._loads: dict[str, WorkerLoad] = {}
        self._read_at = -1.0
        self._inflight: Counter[str] = Counter()  # requests this router has at each worker
        self._inflight_tokens: Counter[str] = Counter()  # prompt tokens it has at each prefill worker
        self._models: dict[str, dict[str, dict[str, float]]] = {}  # model name -> worker -> coefficients
        self.block_size = block_size
        self.default_slo = default_slo or SLO()
        self.metrics = metrics
        self.spec = SpecController(spec_interval_s)
        self._ids = itertools.count()
        self._closing = False
        self._active: set[asyncio.Task] = set()
        self.num_handoff_retries = 0
        self.num_k_changes = 0
        self._k_history: dict[str, list[int]] = {}  # per request in flight, for its report
        self._poller: asyncio.Task | None = None

    # ---------------------------------------------------------------------- Frontend API

    @property
    def model_name(self) -> str:
        return min(self._model_names, key=len)

    def is_ready(self) -> bool:
        if self._closing:
            return False
        kinds = {w.kind for w in self._workers}
        needed = {"colocated"} if self.mode == "colocated" else {"prefill", "decode"}
        return needed <= kinds

    async def refresh(self, force: bool = False) -> None:
        """Read membership and loads from the store (at most every ``workers_ttl_s``)."""
        if not force and time.monotonic() - self._read_at < self._workers_ttl_s:
            return
        def read() -> tuple:
            models = {name: self.store.get_models(name) for name in ("prefill", "decode_step", "speculation")}
            return self.store.list_workers(), self.store.get_loads(), models

        workers, loads, models = await asyncio.to_thread(read)
        self._workers, self._loads, self._models, self._read_at = workers, loads, models, time.monotonic()
        if self.metrics is not None:
            for worker_id, load in loads.items():
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
        arrival = time.monotonic()
        prompt_ids = self._prompt_token_ids(request)
        request = dataclasses.replace(request, slo=SLO(
            request.slo.ttft_s if request.slo.ttft_s is not None else self.default_slo.ttft_s,
            request.slo.tpot_s if request.slo.tpot_s is not None else self.default_slo.tpot_s,
        ))
        request_id = request.request_id or f"{uuid.uuid4().hex[:12]}-{next(self._ids)}"
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
        try:
            await self.refresh()
            if self.mode == "colocated":
                stream = self._colocated(request_id, prompt_ids, request, arrival)
            else:
                stream = self._disaggregated(request_id, prompt_ids, request, arrival)
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    yield delta
        finally:
            self._k_history.pop(request_id, None)
            if task is not None:
                self._active.discard(task)

    # --------------------------------------------------------------------------- phases

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

    async def _colocated(self, request_id: str, prompt_ids: list[int], request: GenerateInput, arrival: float):
        errors: list[str] = []
        for worker_id in self._rank("colocated"):
            handle = self._handle(worker_id)
            params = self._start_params(worker_id, request_id, len(prompt_ids), request.params)
            stream = handle.generate.remote(request_id, prompt_ids, params)
            try:
                async with self._at(worker_id, handle, request_id) as state:
                    self._track_spec(worker_id, request_id, len(prompt_ids), request.params, params)
                    first_at = None
                    async for ref in stream:
                        delta = await _result(ref, worker_id)
                        state["finished"] = delta.finished
                        first_at = first_at or time.monotonic()
                        self._observe_spec(worker_id, handle, delta)
                        if delta.finished:
                            delta = dataclasses.replace(delta, report=RequestReport(
                                decode_worker=worker_id, k_history=tuple(self._k_history.get(request_id, ())),
                                num_draft_tokens=delta.num_draft_tokens, num_accepted_tokens=delta.num_accepted_tokens,
                                prefill_s=first_at - arrival, decode_s=time.monotonic() - first_at, handoff_attempts=0,
                            ))
                        yield delta
                return
            except CapacityError as e:
                errors.append(str(e))
        raise CapacityError(_no_worker("colocated", errors))

    async def _disaggregated(self, request_id: str, prompt_ids: list[int], request: GenerateInput, arrival: float):
        params = request.params
        # Speculation happens on the decode side; the prefill worker samples one token.
        prefill_params = dataclasses.replace(params, num_speculative_tokens=None)
        failures: list[str] = []
        tried: set[str] = set()
        for attempt in range(self.handoff_attempts):
            decode_id, decode_params, destination = await self._reserve(request_id, prompt_ids, request, tried)
            decode = self._handle(decode_id)
            async with self._at(decode_id, decode, request_id) as state:
                prefill_id = (await self._choose_prefill(prompt_ids, request, tried)).worker_id
                prefill = self._handle(prefill_id)
                queue_s = time.monotonic() - arrival
                self._inflight_tokens[prefill_id] += len(prompt_ids)
                try:
                    async with self._at(prefill_id, prefill, request_id) as prefill_state:
                        result = await _result(
                            prefill.prefill.remote(request_id, prompt_ids, prefill_params, destination), prefill_id
                        )
                        prefill_state["finished"] = True  # the request left the prefill worker
                except ServingError as e:  # the handoff failed: release the blocks (on exit), retry
                    failures.append(str(e))
                    tried |= {decode_id, prefill_id}
                    self.num_handoff_retries += 1
                    logger.warning("request %s: handoff attempt %d failed: %s", request_id, attempt + 1, e)
                    continue
                finally:
                    self._inflight_tokens[prefill_id] -= len(prompt_ids)
                first_at = time.monotonic()

                def report(last: GenerateDelta) -> RequestReport:
                    return RequestReport(
                        prefill_worker=prefill_id, decode_worker=decode_id,
                        k_history=tuple(self._k_history.get(request_id, ())),
                        num_draft_tokens=last.num_draft_tokens, num_accepted_tokens=last.num_accepted_tokens,
                        queue_s=queue_s, prefill_s=result.prefill_s, transfer_s=result.handoff_wait_s,
                        decode_s=time.monotonic() - first_at, handoff_attempts=attempt + 1,
                    )

                first = GenerateDelta(
                    request_id, [result.first_token_id], result.text, result.finished, result.finish_reason,
                    num_prompt_tokens=result.num_prompt_tokens, num_output_tokens=1,
                )
                if result.finished:
                    yield dataclasses.replace(first, report=report(first))  # on exit the reservation is released
                    return
                yield first
                if self.metrics is not None:
                    self.metrics.observe_transfer(result.num_kv_bytes, result.handoff_wait_s)
                self._track_spec(decode_id, request_id, len(prompt_ids), params, decode_params)
                stream = decode.generate.remote(request_id, result.first_token_id, result.generator_state)
                async for ref in stream:
                    delta = await _result(ref, decode_id)
                    state["finished"] = delta.finished
                    self._observe_spec(decode_id, decode, delta)
                    yield dataclasses.replace(delta, report=report(delta)) if delta.finished else delta
                return
        raise ServingError(f"request {request_id}: KV handoff failed {self.handoff_attempts} times: {failures[-1]}")

    async def _choose_prefill(self, prompt_ids: list[int], request: GenerateInput, avoid: set[str]) -> Choice:
        """The prefill worker with the lowest predicted TTFT (prefix-cache hits included)."""
        ids = [w.worker_id for w in self._workers if w.kind == "prefill"]
        if not ids:
            raise ServingError("no live prefill worker")
        hashes = prompt_block_hashes(prompt_ids, self.block_size)
        cached = await asyncio.to_thread(self.store.match_prefix, hashes) if hashes else {}
        ranked = rank_prefill(ids, len(prompt_ids), cached, self.block_size, self._loads, self._inflight_tokens,
                              self._models.get("prefill", {}), avoid)
        check_slo("prefill", ranked[0], request.slo.ttft_s)
        return ranked[0]

    async def _reserve(self, request_id: str, prompt_ids: list[int], request: GenerateInput, avoid: set[str]):
        params = request.params
        ids = [w.worker_id for w in self._workers if w.kind == "decode"]
        if not ids:
            raise ServingError("no live decode worker")
        ranked = rank_decode(ids, len(prompt_ids), self.block_size, self._loads, self._inflight,
                             self._models.get("decode_step", {}), avoid)
        check_slo("decode", ranked[0], request.slo.tpot_s)
        errors: list[str] = []
        for worker_id in (c.worker_id for c in ranked):
            started = self._start_params(worker_id, request_id, len(prompt_ids), params)
            try:
                reserve = self._handle(worker_id).reserve.remote(request_id, prompt_ids, started)
                return worker_id, started, await _result(reserve, worker_id)
            except CapacityError as e:
                errors.append(str(e))
            except ServingError as e:  # a dead decode worker: the next one may do
                errors.append(str(e))
        raise CapacityError(_no_worker("decode", errors))

    # ------------------------------------------------------------------------ speculation

    def _start_params(self, worker_id: str, request_id: str, num_prompt_tokens: int, params: Any) -> Any:
        """The request's parameters for this worker: an unpinned request starts at the k the
        controller would give it in the worker's current batch (not the worker's default)."""
        if params.num_speculative_tokens is not None:
            return params
        k = self.spec.initial_k(worker_id, request_id, num_prompt_tokens, self._k_max(worker_id),
                                self._models.get("decode_step", {}).get(worker_id), self._inflight[worker_id])
        return params if k is None else dataclasses.replace(params, num_speculative_tokens=k)

    def _track_spec(self, worker_id: str, request_id: str, num_prompt_tokens: int, params: Any, started: Any) -> None:
        """Follow a request the worker now runs with ``started`` (params: what the client asked)."""
        spec = self._models.get("speculation", {}).get(worker_id, {})
        if spec.get("k_max", 0) <= 0:
            return
        pinned = params.num_speculative_tokens
        initial = started.num_speculative_tokens
        initial = int(spec.get("k_default", 0)) if initial is None else initial
        self.spec.add(worker_id, request_id, num_prompt_tokens, initial, pinned)
        self._k_history[request_id] = [initial]

    def _observe_spec(self, worker_id: str, handle: Any, delta: GenerateDelta) -> None:
        """Feed a delta's counters to the controller; push any k it changed to the worker."""
        if delta.finished:
            self.spec.remove(worker_id, delta.request_id)
            return
        k_max = self._k_max(worker_id)
        changed = self.spec.observe(worker_id, delta.request_id, len(delta.token_ids), delta.num_draft_tokens,
                                    delta.num_accepted_tokens, k_max, self._models.get("decode_step", {}).get(worker_id))
        for request_id, k in changed.items():
            handle.set_speculation.remote(request_id, k)  # applies from the worker's next step
            self._k_history.setdefault(request_id, []).append(k)
            self.num_k_changes += 1
            if self.metrics is not None:
                self.metrics.observe_k(k)

    def _k_max(self, worker_id: str) -> int:
        return int(self._models.get("speculation", {}).get(worker_id, {}).get("k_max", 0))

    # ------------------------------------------------------------------- worker choice

    def _rank(self, kind: str, avoid: set[str] = frozenset()) -> list[str]:
        """Live workers of a kind, least loaded first; ones in ``avoid`` go last."""
        ids = [w.worker_id for w in self._workers if w.kind == kind]
        if not ids:
            raise ServingError(f"no live {kind} worker")

        def key(worker_id: str) -> tuple:
            load = self._loads.get(worker_id)
            reported = (load.num_queued_prompt_tokens, load.num_running_requests, -load.num_free_blocks) if load else ()
            return (worker_id in avoid, self._inflight[worker_id], reported, worker_id)

        return sorted(ids, key=key)

    def _handle(self, worker_id: str) -> Any:
        if worker_id not in self._handles:
            try:
                self._handles[worker_id] = self._get_actor(worker_id)
            except ValueError as e:  # listed in the store, gone from Ray
                raise ServingError(f"worker {worker_id} is not reachable: {e}") from None
        return self._handles[worker_id]

    @contextlib.asynccontextmanager
    async def _at(self, worker_id: str, handle: Any, request_id: str):
        """Count the request as in flight at a worker; unless it finished there, abort it there
        on the way out (cancel, error, or a released reservation)."""
        state = {"finished": False}
        self._inflight[worker_id] += 1
        try:
            yield state
        finally:
            self._inflight[worker_id] -= 1
            self.spec.remove(worker_id, request_id)
            if not state["finished"]:
                with contextlib.suppress(Exception):
                    await asyncio.shield(_result(handle.abort.remote(request_id), worker_id))


async def _result(ref: Any, worker_id: str) -> Any:
    """Await a worker call; its own exception comes back unwrapped, a dead worker as ServingError."""
    try:
        return await ref
    except RayTaskError as e:
        cause = e.cause
        if isinstance(cause, ValueError | CapacityError | ServingError):
            raise type(cause)(*cause.args) from None
        raise ServingError(f"worker {worker_id} failed: {type(cause).__name__}: {cause}") from None
    except RayActorError as e:
        raise ServingError(f"worker {worker_id} died: {e}") from None


def _no_worker(kind: str, errors: list[str]) -> str:
    detail = f" (last refusal: {errors[-1]})" if errors else ""
    return f"no {kind} worker can take the request now{detail}"
