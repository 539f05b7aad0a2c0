"""Stand-in servers with known service times for the load tester's tests: splitserve's gRPC
Generation service (grpc.aio, from the committed stubs) and an OpenAI-compatible SSE server
(aiohttp), both on a free port.

Each request waits ``ttft_s``, sends its first token, then ``tokens_per_chunk`` tokens every
``itl_s`` until ``max_tokens``: TTFT = ttft_s and TPOT = itl_s / tokens_per_chunk, whatever the
load. Above ``capacity`` requests in flight, a request is refused (RESOURCE_EXHAUSTED / 429),
or with ``queue`` waits (first come, first served) for one to end.
A prompt containing "FAIL" fails before its first token (UNAVAILABLE / 500), "MIDFAIL" after
it, and "HANG" never answers.

For verdicts that must not depend on the machine's speed, ``InProcessClient`` serves a Service
in process (no server, no network) and ``run_on_virtual_time`` runs it on an event loop whose
clock is virtual: the sleeps take no real time and every time measured is the exact sum of the
service's sleeps, so attainments and refusals are computable to the last request.
"""

from __future__ import annotations

import asyncio
import json
import selectors
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import grpc
from aiohttp import web

from splitserve.loadtest.clients import RequestFailed
from splitserve.loadtest.records import Chunk, RequestRecord, RequestSpec
from splitserve.protos.splitserve.v1 import serving_pb2 as pb
from splitserve.protos.splitserve.v1 import serving_pb2_grpc as pb_grpc

T = TypeVar("T")

MODEL = "stand-in"
REPORT = pb.RequestReport(prefill_worker="prefill-0", decode_worker="decode-0", k_history=[3, 2], draft_tokens=6,
                          accepted_tokens=4, queue_s=0.001, prefill_s=0.05, transfer_s=0.002, decode_s=0.1,
                          handoff_attempts=1)


@dataclass
class Service:
    """How the stand-in serves: timings, capacity; what it has seen."""

    ttft_s: float = 0.05
    itl_s: float = 0.01
    tokens_per_chunk: int = 1
    capacity: int | None = None
    queue: bool = False
    retry_after_s: float | None = None  # the retry hint InProcessClient's refusals carry
    in_flight: int = 0
    max_in_flight: int = 0
    num_refused: int = 0
    bodies: list[Any] = field(default_factory=list)  # gRPC requests or HTTP bodies, in arrival order
    _semaphore: asyncio.Semaphore | None = None

    def admit(self, body: Any) -> bool:
        """Record the request; False when it must be refused for capacity."""
        self.bodies.append(body)
        if self.capacity is not None and self.in_flight >= self.capacity and not self.queue:
            self.num_refused += 1
            return False
        return True

    async def chunks(self, prompt: str, max_tokens: int) -> AsyncIterator[int]:
        """The number of tokens of each chunk, at the service's pace; counts the request in
        flight while it runs."""
        if self.queue:
            async with self._slots():
                async for tokens in self._serve(prompt, max_tokens):
                    yield tokens
        else:
            async for tokens in self._serve(prompt, max_tokens):
                yield tokens

    def _slots(self) -> asyncio.Semaphore:
        if self._semaphore is None:
            assert self.capacity is not None, "a queue needs a capacity"
            self._semaphore = asyncio.Semaphore(self.capacity)
        return self._semaphore

    async def _serve(self, prompt: str, max_tokens: int) -> AsyncIterator[int]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if "HANG" in prompt:
                await asyncio.Event().wait()
            await asyncio.sleep(self.ttft_s)
            yield 1
            sent = 1
            while sent < max_tokens:
                await asyncio.sleep(self.itl_s)
                if "MIDFAIL" in prompt:
                    raise RuntimeError("decode-1 died")
                tokens = min(self.tokens_per_chunk, max_tokens - sent)
                sent += tokens
                yield tokens
        finally:
            self.in_flight -= 1


# ------------------------------------------------------------------------------- gRPC


class StandInGeneration(pb_grpc.GenerationServicer):
    def __init__(self, service: Service):
        self.service = service

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        if "FAIL" in request.prompt and "MIDFAIL" not in request.prompt:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill-0 died")
        if not self.service.admit(request):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no decode worker has free KV blocks")
        sent = 0
        # The token it streams: 7, or the k the request pinned (so a test can see it arrived).
        token = request.num_speculative_tokens if request.HasField("num_speculative_tokens") else 7
        try:
            async for tokens in self.service.chunks(request.prompt, request.max_tokens):
                sent += tokens
                done = sent == request.max_tokens
                yield pb.GenerateResponse(
                    request_id="r", token_ids=[token] * tokens, text="x" * tokens, finished=done,
                    finish_reason="length" if done else "", usage=pb.Usage(prompt_tokens=5, completion_tokens=sent),
                    report=REPORT if done else None)
        except RuntimeError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))


async def start_grpc(service: Service) -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server of the stand-in and its port; stop it with ``server.stop(0)``."""
    server = grpc.aio.server()
    pb_grpc.add_GenerationServicer_to_server(StandInGeneration(service), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


# ------------------------------------------------------------------------------- HTTP


class StandInOpenAI:
    """/v1/completions (SSE only) and /v1/models. continuous_usage: whether it honours
    stream_options.continuous_usage_stats (vLLM and splitserve do; others do not)."""

    def __init__(self, service: Service, continuous_usage: bool = True):
        self.service = service
        self.continuous_usage = continuous_usage
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if "FAIL" in body["prompt"] and "MIDFAIL" not in body["prompt"]:
            return web.json_response({"error": {"message": "prefill-0 died", "type": "server_error"}}, status=503)
        if not self.service.admit(body):
            return web.json_response({"error": {"message": "no capacity", "type": "rate_limit_error"}}, status=429)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        continuous = self.continuous_usage and body["stream_options"].get("continuous_usage_stats")
        sent = 0
        try:
            async for tokens in self.service.chunks(body["prompt"], body["max_tokens"]):
                sent += tokens
                usage = {"prompt_tokens": 5, "completion_tokens": sent} if continuous else None
                finish = "length" if sent == body["max_tokens"] else None
                await response.write(_event({"choices": [{"index": 0, "text": "x", "finish_reason": finish}],
                                             "usage": usage}))
            await response.write(_event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": sent}}))
        except RuntimeError as error:
            await response.write(_event({"error": {"message": str(error), "type": "server_error"}}))
        await response.write(b"data: [DONE]\n\n")
        return response


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


# ------------------------------------------------------------------ in process, virtual time


class InProcessClient:
    """A load test Client serving a Service in process, as the stand-in gRPC server does (same
    refusals, failures and messages), timing each chunk with the clock the runner passes."""

    target = "in-process"
    model: str | None = MODEL

    def __init__(self, service: Service):
        self.service = service

    async def __aenter__(self) -> InProcessClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        pass

    async def send(self, spec: RequestSpec, record: RequestRecord, clock: Callable[[], float]) -> None:
        if "FAIL" in spec.prompt and "MIDFAIL" not in spec.prompt:
            raise RequestFailed("failed", "UNAVAILABLE: prefill-0 died")
        if not self.service.admit(spec):
            raise RequestFailed("refused", "RESOURCE_EXHAUSTED: no decode worker has free KV blocks",
                                self.service.retry_after_s)
        try:
            async for tokens in self.service.chunks(spec.prompt, spec.max_tokens):
                record.chunks.append(Chunk(clock(), tokens))
        except RuntimeError as error:
            raise RequestFailed("failed", f"UNAVAILABLE: {error}") from None
        record.server = {"decode_worker": REPORT.decode_worker, "finish_reason": "length"}


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock (starting at 0): when nothing is ready to run it jumps
    to its next timer instead of waiting for it. asyncio.sleep, timeouts and loop.time() then
    agree exactly and cost no real time. Only for code that waits on timers, not on I/O."""

    def __init__(self) -> None:
        self.now_s = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now_s


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualTimeLoop):
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # no timer pending: only another thread can wake the loop
            return super().select(None)
        ready = super().select(0)
        if not ready:
            self._loop.now_s += timeout  # the next timer is due now
        return ready


def run_on_virtual_time(main: Coroutine[Any, Any, T], limit_s: float = 3600.0) -> T:
    """main run to its end on a VirtualTimeLoop; limit_s (virtual seconds) ends a deadlock."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(asyncio.wait_for(main, limit_s))
