"""Membership: a worker's entry in the MetadataStore, renewed by a heartbeat thread.

Each beat keeps the worker listed (joining afresh when its membership lapsed, which wiped what
the store held for it) and publishes what routers read about it: its load, its prefix-cache
changes, its fitted latency models and its speculation limits -- the heartbeat, load and
models in one store round trip (``MetadataStore.report``), the prefix changes in another when
there are any. The beat runs on its own
thread, so a slow store never blocks the engine; a failed beat is logged and the next one
starts over with a fresh registration. The first, ``join``, is retried while the store is slow
or away, up to a deadline: a worker starting beside a busy store waits for it rather than
failing its start.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from splitserve.cluster.store import MetadataStore, StoreConnectionError, WorkerInfo, WorkerLoad
from splitserve.protocol import SpeculationLimits
from splitserve.worker.prefix_mirror import PrefixMirror
from splitserve.worker.step_models import StepModels

logger = logging.getLogger(__name__)


class Membership:
    def __init__(
        self,
        store: MetadataStore,
        info: WorkerInfo,
        ttl_s: float,
        load: Callable[[], WorkerLoad],
        models: StepModels,
        speculation: SpeculationLimits,
        prefixes: PrefixMirror | None,
    ):
        self.store, self.info, self.ttl_s = store, info, ttl_s
        self._load, self._models, self._speculation, self._prefixes = load, models, speculation, prefixes
        self._must_register = True

    def beat(self) -> None:
        """Stay listed, then publish; any failure makes the next beat register afresh."""
        store, worker_id = self.store, self.info.worker_id
        try:
            models = self._models.refit() | {SpeculationLimits.NAME: self._speculation.to_record()}
            is_fresh = self._must_register
            if not is_fresh and not store.report(worker_id, self.ttl_s, self._load(), models):
                is_fresh = True  # it had lapsed: what it wrote was dropped
            if is_fresh:
                store.register_worker(self.info, self.ttl_s)
                self._must_register = False
                store.report(worker_id, self.ttl_s, self._load(), models)
            if self._prefixes is not None:
                self._prefixes.publish(store, worker_id, is_fresh)
        except Exception:
            self._must_register = True
            raise

    def join(self, timeout_s: float, retry_s: float, sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic) -> None:
        """The first beat, tried every ``retry_s`` while the store does not answer in time
        (StoreConnectionError), for up to ``timeout_s``; then its error is raised. Any other
        error (the store refused the worker) is raised at once."""
        deadline = clock() + timeout_s
        while True:
            try:
                return self.beat()
            except StoreConnectionError as e:
                if clock() + retry_s > deadline:
                    raise
                logger.warning("%s: could not join the store yet (%s); retrying", self.info.worker_id, e)
                sleep(retry_s)

    def change_kind(self, kind: str) -> None:
        """List the worker under another kind (its role) from the next beat on."""
        self.info = dataclasses.replace(self.info, kind=kind)  # type: ignore[arg-type]
        self._must_register = True

    def leave(self) -> None:
        try:
            self.store.deregister_worker(self.info.worker_id)
        except Exception:  # the store may be gone first at shutdown; the TTL cleans up
            logger.warning("%s: could not deregister", self.info.worker_id, exc_info=True)


class Heartbeat:
    """Calls ``beat`` every ``interval_s`` on its own thread until stopped."""

    def __init__(self, name: str, interval_s: float, beat: Callable[[], None]):
        self._beat = beat
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self._beat()
            except Exception:  # a store hiccup must not kill the worker; the next beat retries
                logger.warning("%s failed", self._thread.name, exc_info=True)
