"""EngineLoop: one thread owns an LLMEngine; asyncio code talks to it through calls and streams.

The engine is single-threaded by design. Its thread alternates between the calls other code
submitted (``await loop.call(engine.add_request, ...)`` — run between steps, results and
exceptions carried back to the caller) and engine steps while any request is unfinished. Each
step's outputs go to the asyncio queue of the request's stream, if one is open. When idle the
thread blocks on the call queue, so an idle worker costs no CPU; ``cpu_s`` is the CPU time the
thread has used (what serving overhead is measured against).

Once per ``release_memory_every_s``, if the engine stepped since the last time, the thread
hands the heap memory the steps freed back to the OS (``worker.memory``), between steps or
after it went idle: otherwise a worker's RSS stays at the peak of its heaviest burst. An idle
worker that already released does not wake for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from splitserve.engine.engine import LLMEngine
from splitserve.engine.output import RequestOutput
from splitserve.errors import ServingError
from splitserve.worker.memory import release_free_memory

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class EngineLoad:
    """A snapshot of the engine's load, taken on the engine thread after every step and call."""

    num_queued_prompt_tokens: int  # prompt tokens of waiting requests not computed yet
    num_running_requests: int  # running, waiting and reserved
    num_free_blocks: int
    num_total_blocks: int
    num_steps: int


class StreamEnd:
    """Put on a stream when its request ended without a final output (aborted, or the engine
    failed); ``error`` is None for an abort."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class EngineLoop:
    def __init__(self, engine: LLMEngine, name: str = "engine", release_memory_every_s: float | None = None):
        self.engine = engine
        self.name = name
        self.release_memory_every_s = release_memory_every_s  # None: never hand free memory back
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple, dict, concurrent.futures.Future] | None]
        self._calls = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._aio: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._num_steps = 0
        self._error: BaseException | None = None
        self.cpu_s = 0.0  # CPU seconds of the engine thread (steps and calls), as of its last step or call
        self.on_step: Callable[[Any], None] | None = None  # gets each step's StepStats (engine thread)
        self.load = self._snapshot()
        self.num_memory_releases = 0
        self.release_s = 0.0  # seconds the engine thread spent handing memory back
        self._last_release = time.monotonic()
        self._stepped_since_release = False

    def start(self, aio_loop: asyncio.AbstractEventLoop) -> None:
        """Start the engine thread; stream items are delivered on ``aio_loop``."""
        self._aio = aio_loop
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the current step, then end the thread; open streams end with an error."""
        self._stopping = True
        self._calls.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._fail_streams(ServingError(f"{self.name} is shutting down"))

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the engine thread between steps; return its result."""
        if self._stopping or self._error is not None:
            raise ServingError(f"{self.name} is not running" + (f": {self._error}" if self._error else ""))
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, args, kwargs, future))
        return await asyncio.wrap_future(future)

    def open_stream(self, request_id: str) -> asyncio.Queue:
        """A queue of the request's outputs (RequestOutput, then maybe a StreamEnd); call on the
        event loop, before the request can produce output."""
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def end_stream(self, request_id: str, error: BaseException | None = None) -> None:
        """Wake the stream's reader with a StreamEnd (the request was aborted or failed)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(StreamEnd(error))

    # ---------------------------------------------------------------------- engine thread

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            if not self._run_calls(block=not engine.has_unfinished_requests(), timeout_s=self._release_wait_s()):
                break
            self._release_memory_if_due()
            if not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # the engine's state is unknown now: fail everything, loudly
                logger.exception("%s: engine step failed", self.name)
                self._error = e
                self._fail_streams(ServingError(f"{self.name} failed: {type(e).__name__}: {e}"))
                return
            self._num_steps += 1
            self._stepped_since_release = True
            self.load = self._snapshot()
            self.cpu_s = time.thread_time()
            if self.on_step is not None and engine.step_stats:
                self.on_step(engine.step_stats[-1])
            for output in outputs:
                self._deliver(output)

    def _run_calls(self, block: bool, timeout_s: float | None = None) -> bool:
        """Run queued calls (waiting for one if ``block``, up to ``timeout_s``); False when asked
        to stop."""
        while True:
            try:
                item = self._calls.get(block=block, timeout=timeout_s)
            except queue.Empty:
                return True
            if item is None:
                return False
            fn, args, kwargs, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:
                    future.set_exception(e)
            self.load = self._snapshot()
            self.cpu_s = time.thread_time()
            block = False

    def _release_wait_s(self) -> float | None:
        """How long an idle thread may wait for a call before its memory release is due (None:
        none is due: releases are off, or it has not stepped since the last)."""
        if self.release_memory_every_s is None or not self._stepped_since_release:
            return None
        return max(self._last_release + self.release_memory_every_s - time.monotonic(), 0.0)

    def _release_memory_if_due(self) -> None:
        wait_s = self._release_wait_s()
        if wait_s is None or wait_s > 0:
            return
        start = time.perf_counter()
        release_free_memory()
        self.release_s += time.perf_counter() - start
        self.num_memory_releases += 1
        self._last_release, self._stepped_since_release = time.monotonic(), False

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is not None and self._aio is not None:
            self._aio.call_soon_threadsafe(stream.put_nowait, output)

    def _fail_streams(self, error: BaseException) -> None:
        if self._aio is None:
            return
        for stream in list(self._streams.values()):
            self._aio.call_soon_threadsafe(stream.put_nowait, StreamEnd(error))

    def _snapshot(self) -> EngineLoad:
        engine = self.engine
        scheduler = engine.scheduler
        return EngineLoad(
            num_queued_prompt_tokens=sum(r.num_tokens - r.num_computed_tokens for r in scheduler.waiting),
            num_running_requests=scheduler.num_unfinished + engine.num_reserved,
            num_free_blocks=engine.block_pool.num_free_blocks,
            num_total_blocks=engine.block_pool.num_blocks,
            num_steps=self._num_steps,
        )
