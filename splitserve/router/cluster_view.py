"""ClusterView: what a router knows of the workers -- who is alive, their loads and published
models (read from the MetadataStore in one round trip, ``MetadataStore.snapshot``, reused for
``ttl_s``), their Ray actor handles, and the requests this router has in flight at each.

Calls to workers go through ``call``, which unwraps a worker's own errors (ValueError,
CapacityError, ServingError) and turns a dead or unreachable worker into ``WorkerGone``. That
is the first sign of a worker's death, seconds before its membership lapses in the store: the
view leaves the worker out of every pool at once, until the store lists a new start of it or
drops it -- or, where Ray only found it unreachable (``ActorUnavailableError``: it may come
back), until ``gone_s`` passes.

The models arrive as typed objects (``WorkerModels``), rebuilt from the coefficients the
workers publish; placement and the speculation controller read them. It does not decide
anything: the Router ranks and places with these facts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from splitserve.cluster.store import MetadataStore, WorkerInfo, WorkerLoad
from splitserve.errors import CapacityError, ServingError, WorkerGone
from splitserve.latency import DecodeStepModel, MixedStepModel, PrefillModel
from splitserve.protocol import SpeculationLimits
from splitserve.router.placement import load_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerModels:
    """One worker's published models (None: it publishes none of that kind, or none yet)."""

    prefill: PrefillModel | None = None
    decode_step: DecodeStepModel | None = None
    mixed_step: MixedStepModel | None = None
    speculation: SpeculationLimits = SpeculationLimits(0, 0)


MODEL_NAMES = (PrefillModel.NAME, DecodeStepModel.NAME, MixedStepModel.NAME, SpeculationLimits.NAME)


def typed_models(published: dict[str, dict[str, dict[str, float]]]) -> dict[str, WorkerModels]:
    """Every live worker's models, typed, from the coefficients per model name and worker."""
    prefill, decode, mixed, speculation = (published.get(name, {}) for name in MODEL_NAMES)
    return {
        worker_id: WorkerModels(
            prefill=PrefillModel.from_coefficients(prefill[worker_id]) if worker_id in prefill else None,
            decode_step=DecodeStepModel.from_coefficients(decode[worker_id]) if worker_id in decode else None,
            mixed_step=MixedStepModel.from_coefficients(mixed[worker_id]) if worker_id in mixed else None,
            speculation=SpeculationLimits.from_record(speculation.get(worker_id, {})),
        )
        for worker_id in {*prefill, *decode, *mixed, *speculation}
    }


class ClusterView:
    def __init__(self, store: MetadataStore, get_actor: Callable[[str], Any], ttl_s: float = 0.2,
                 gone_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self._get_actor = get_actor
        self._ttl_s = ttl_s
        self._gone_s, self._clock = gone_s, clock
        self._gone: dict[str, tuple[float | None, float]] = {}  # worker -> (the start it died in, until)
        self.workers: list[WorkerInfo] = []
        self.loads: dict[str, WorkerLoad] = {}
        self.models: dict[str, WorkerModels] = {}
        self.inflight: Counter[str] = Counter()  # requests this router has at each worker
        self.inflight_tokens: Counter[str] = Counter()  # prompt tokens it has at each prefill worker
        self._handles: dict[str, Any] = {}
        self._read_at = -1.0

    async def refresh(self, force: bool = False) -> None:
        """Read membership, loads and models from the store (at most every ``ttl_s``)."""
        if not force and time.monotonic() - self._read_at < self._ttl_s:
            return

        snapshot = await asyncio.to_thread(self.store.snapshot, MODEL_NAMES)
        self.workers, self.loads, self.models = self._alive(snapshot.workers), snapshot.loads, \
            typed_models(snapshot.models)
        self._read_at = time.monotonic()

    def _alive(self, listed: list[WorkerInfo]) -> list[WorkerInfo]:
        """The listed workers, less those a call found gone (in the start the store still lists)."""
        now, starts = self._clock(), {w.worker_id: w.started_at for w in listed}
        self._gone = {w: (start, until) for w, (start, until) in self._gone.items()
                      if now < until and w in starts and start in (None, starts[w])}
        return [w for w in listed if w.worker_id not in self._gone]

    def gone(self, worker_id: str, dead: bool = True) -> None:
        """A call found the worker dead (or, ``dead=False``, unreachable for now): leave it out
        of every pool from now on (see the module docstring), and fetch its handle anew should
        it come back."""
        start = next((w.started_at for w in self.workers if w.worker_id == worker_id), None)
        self._gone[worker_id] = (start, math.inf if dead else self._clock() + self._gone_s)
        self.workers = [w for w in self.workers if w.worker_id != worker_id]
        self._handles.pop(worker_id, None)

    async def call(self, ref: Any, worker_id: str) -> Any:
        """Await a worker call; the worker's own exception comes back unwrapped, a failure of
        its code as ServingError, a dead or unreachable worker as WorkerGone (and the worker
        leaves the pools, ``gone``)."""
        try:
            return await ref
        except RayTaskError as e:
            cause = e.cause
            if isinstance(cause, ValueError | CapacityError | ServingError):
                raise type(cause)(*cause.args) from None
            raise ServingError(f"worker {worker_id} failed: {type(cause).__name__}: {cause}") from None
        except RayActorError as e:
            self.gone(worker_id, dead=not isinstance(e, ActorUnavailableError))
            raise WorkerGone(worker_id, f"worker {worker_id} died or cannot be reached: {e}") from None

    def members(self, kind: str) -> list[str]:
        """The live workers of a kind (a pool, in elastic mode), maybe none."""
        return [w.worker_id for w in self.workers if w.kind == kind]

    def ids(self, kind: str) -> list[str]:
        """The live workers of a kind; ServingError when there is none."""
        ids = self.members(kind)
        if not ids:
            raise ServingError(f"no live {kind} worker")
        return ids

    def has_kinds(self, kinds: set[str]) -> bool:
        return kinds <= {w.kind for w in self.workers}

    def models_of(self, worker_id: str) -> WorkerModels:
        return self.models.get(worker_id, WorkerModels())

    def handle(self, worker_id: str) -> Any:
        """The worker's actor handle; WorkerGone when it is listed in the store but gone from Ray."""
        if worker_id not in self._handles:
            try:
                self._handles[worker_id] = self._get_actor(worker_id)
            except ValueError as e:  # listed in the store, gone from Ray
                self.gone(worker_id)
                raise WorkerGone(worker_id, f"worker {worker_id} is not reachable: {e}") from None
        return self._handles[worker_id]

    def least_loaded(self, kind: str) -> list[str]:
        """Live workers of a kind, least loaded first (this router's in-flight, then reported)."""
        return sorted(self.ids(kind), key=self._load_key)

    def least_loaded_of(self, worker_ids: list[str]) -> str:
        return min(worker_ids, key=self._load_key)

    def by_load(self, worker_ids: list[str]) -> list[str]:
        """``worker_ids``, least loaded first."""
        return sorted(worker_ids, key=self._load_key)

    def _load_key(self, worker_id: str) -> tuple:
        return load_key(worker_id, self.inflight[worker_id], self.loads.get(worker_id))
