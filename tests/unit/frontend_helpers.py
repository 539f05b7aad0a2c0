"""Test stand-ins shared by the front-end tests (gRPC, HTTP): a Frontend over one in-process
LLMEngine, one that answers one token without a model, one that streams without end, and an
event loop in a thread for servers that tests call synchronously."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from splitserve.engine.engine import LLMEngine
from splitserve.protocol import GenerateDelta
from splitserve.router.api import GenerateInput

MODEL_NAME = "smollm2-test"


class EngineFrontend:
    """Stands in for the router: a Frontend over one in-process LLMEngine.

    ``run`` is the step loop (each step in a worker thread, so the event loop keeps serving
    while the model runs); the lock keeps add_request and abort out of a running step.
    fail_with makes the next calls raise that error before their first yield.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.ready = True
        self.fail_with: Exception | None = None
        self.num_closed_early = 0
        self._lock = asyncio.Lock()
        self._has_work = asyncio.Event()
        self._queues: dict[str, asyncio.Queue] = {}

    @property
    def model_name(self) -> str:
        return MODEL_NAME

    def is_ready(self) -> bool:
        return self.ready

    async def run(self) -> None:
        while True:
            await self._has_work.wait()
            async with self._lock:
                outputs = await asyncio.to_thread(self.engine.step)
                if not self.engine.has_unfinished_requests():
                    self._has_work.clear()
            for output in outputs:
                if output.request_id in self._queues:
                    self._queues[output.request_id].put_nowait(output)

    async def generate(self, request: GenerateInput) -> AsyncIterator[GenerateDelta]:
        if self.fail_with is not None:
            raise self.fail_with
        if request.model not in (None, MODEL_NAME):
            raise ValueError(f"model {request.model!r} is not served here; this server serves {MODEL_NAME!r}")
        tokenizer = self.engine.tokenizer
        prompt: str | list[int] = request.prompt if request.prompt is not None else request.prompt_token_ids or []
        if request.messages is not None:
            prompt = tokenizer.encode(tokenizer.apply_chat_template(request.messages), add_special_tokens=False)
        async with self._lock:
            request_id = self.engine.add_request(prompt, request.params, request.request_id)
            queue = self._queues[request_id] = asyncio.Queue()
            self._has_work.set()
        finished = False
        try:
            while not finished:
                output = await queue.get()
                finished = output.finished
                yield GenerateDelta(
                    request_id, output.new_token_ids, output.new_text, finished,
                    str(output.finish_reason) if output.finish_reason else None,
                    len(output.prompt_token_ids), len(output.token_ids),
                    output.spec.num_draft_tokens, output.spec.num_accepted_tokens,
                )
        except (GeneratorExit, asyncio.CancelledError):
            self.num_closed_early += 1
            raise
        finally:
            del self._queues[request_id]
            if not finished:
                async with self._lock:
                    self.engine.abort(request_id)


class OneTokenFrontend:
    """Answers every request at once with one finished token (front-end tests that need no model)."""

    model_name = MODEL_NAME

    def is_ready(self) -> bool:
        return True

    async def generate(self, request: GenerateInput) -> AsyncIterator[GenerateDelta]:
        yield GenerateDelta("r", [1], "a", finished=True, finish_reason="stop", num_prompt_tokens=1,
                            num_output_tokens=1)


class FloodFrontend:
    """Streams large deltas without end, as fast as they are taken; counts the streams a front
    end closed (a request it gave up: the router would abort it)."""

    model_name = MODEL_NAME

    def __init__(self, delta_chars: int = 16 << 10):
        self.delta_chars = delta_chars
        self.num_closed = 0

    def is_ready(self) -> bool:
        return True

    async def generate(self, request: GenerateInput) -> AsyncIterator[GenerateDelta]:
        try:
            for n in itertools.count(1):
                yield GenerateDelta("flood", [1], "a" * self.delta_chars, finished=False, num_prompt_tokens=1,
                                    num_output_tokens=n)
                await asyncio.sleep(0)
        finally:
            self.num_closed += 1


class LoopThread:
    """An event loop in a daemon thread: the server side, while tests call it synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="frontend-test-loop")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
