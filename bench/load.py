"""The benchmarks' side of splitserve.loadtest: every load a benchmark sends goes through the
library's runner and is scored by splitserve/loadtest/metrics.py (TTFT, TPOT, attainment,
goodput), so bench/ and ``splitserve loadtest`` count the same way.

What the library's own gRPC client does not do, ``BenchClient`` adds: it pins every request's
k (``num_speculative_tokens``; None lets the router choose) and keeps each request's output
token ids for the benchmarks' greedy-output checks. Prompts go as text, as the library sends
them; the server tokenizes them.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

import grpc

from splitserve.loadtest.arrivals import Arrival
from splitserve.loadtest.clients import Clock, RequestFailed, TargetError, served_report
from splitserve.loadtest.metrics import GOODPUT_ATTAINMENT, RequestMetrics, goodput, request_metrics
from splitserve.loadtest.records import Chunk, RequestRecord, RequestSpec, Status
from splitserve.loadtest.runner import run
from splitserve.protos.splitserve.v1 import serving_pb2_grpc as pb_grpc
from splitserve.router.client import make_request

CONNECT_TIMEOUT_S = 30.0
POISSON = Arrival("poisson")
ONE_AT_A_TIME = Arrival("concurrency", concurrency=1)


class BenchClient:
    """splitserve's Generation service over one grpc.aio channel, as a splitserve.loadtest
    ``Client``; see the module docstring. Enter it (``async with``) before a run."""

    def __init__(self, address: str, num_speculative_tokens: int | None = None):
        self.target, self.model = f"grpc://{address}", None
        self.num_speculative_tokens = num_speculative_tokens
        self._address = address
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GenerationStub | None = None
        self._outputs: dict[int, list[int]] = {}

    async def __aenter__(self) -> BenchClient:
        self._channel = grpc.aio.insecure_channel(self._address)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            await self._channel.close()
            raise TargetError(f"cannot reach {self.target} within {CONNECT_TIMEOUT_S:g} s") from None
        self._stub = pb_grpc.GenerationStub(self._channel)  # type: ignore[no-untyped-call]
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def send(self, spec: RequestSpec, record: RequestRecord, clock: Clock) -> None:
        """Stream one request (greedy, EOS ignored), a Chunk per message with tokens."""
        assert self._stub is not None, "enter the client (async with) before sending"
        request = make_request(spec.prompt, max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True,
                               num_speculative_tokens=self.num_speculative_tokens)
        call = self._stub.Generate(request)
        ids: list[int] = []
        self._outputs[spec.index] = ids
        last = None
        try:
            async for response in call:
                if response.token_ids:
                    record.chunks.append(Chunk(clock(), len(response.token_ids)))
                    ids.extend(response.token_ids)
                last = response
        except grpc.aio.AioRpcError as error:
            status: Status = "refused" if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "failed"
            raise RequestFailed(status, f"{error.code().name}: {error.details()}") from None
        finally:
            call.cancel()  # a no-op once the stream has ended
        if last is None or not last.finished:
            raise RequestFailed("failed", "the stream ended before the request finished")
        record.server = served_report(last)
        if last.finish_reason == "abort":
            raise RequestFailed("failed", "the server aborted the request")

    def take_outputs(self, num_requests: int) -> list[list[int]]:
        """The output token ids of the last run's requests, by index ([] for one never sent), and
        forget them."""
        outputs = [self._outputs.get(index, []) for index in range(num_requests)]
        self._outputs.clear()
        return outputs


async def send_alone(client: BenchClient, spec: RequestSpec) -> RequestMetrics:
    """One request with nothing else in flight, through the library's runner; its metrics.
    RuntimeError when it did not complete."""
    record = (await run(client, [spec], ONE_AT_A_TIME, None)).records[0]
    metrics = request_metrics(record)
    if metrics is None:
        raise RuntimeError(f"request {spec.index} ({spec.prompt_tokens} prompt tokens) {record.status}: "
                           f"{record.error}")
    return metrics


async def send_together(client: BenchClient, specs: list[RequestSpec]) -> list[RequestRecord]:
    """Every spec at once (warm-ups: each worker and link gets a request)."""
    return (await run(client, specs, Arrival("concurrency", concurrency=len(specs)), None)).records


def goodput_note(points: list[tuple[float, float]]) -> dict:
    """metrics.goodput of (rate, attainment) points, with a note on how it was found."""
    if len(points) < 2:
        return {"goodput_rps": None, "note": "one rate: sweep several rates for goodput"}
    value = goodput(points)
    if value is None:
        note = f"below the lowest rate {min(points)[0]:g}"
    elif max(points)[1] >= GOODPUT_ATTAINMENT:
        note = "at least (the highest rate met it)"
    else:
        note = "interpolated"
    return {"goodput_rps": value, "note": note}
