"""The load tester's streaming clients against stand-in servers with known service times (gRPC
and OpenAI SSE, tests/unit/loadtest_servers.py) and splitserve's own front ends (gRPC, HTTP): measured
TTFT/TPOT, token counts per chunk (with and without continuous usage), the server's report,
refusals and failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from splitserve.loadtest.clients import (
    GrpcClient, OpenAIClient, RequestFailed, TargetError, make_client, with_total,
)
from splitserve.loadtest.records import Chunk, RequestRecord, RequestSpec
from splitserve.errors import CapacityError
from splitserve.protocol import GenerateDelta, RequestReport
from splitserve.router.api import GenerateInput
from splitserve.router.grpc_server import GrpcServer
from splitserve.router.http_server import HttpServer
from tests.unit.loadtest_servers import MODEL, Service, StandInOpenAI, start_grpc

TTFT_S, ITL_S = 0.05, 0.01
# Measured against a real server, times from the request's start are only bounded below (the
# server's sleeps wake late, never early); TPOT is not (a late read of the first token shortens
# it), and the upper bounds only catch a gross error, as a busy machine can add any delay. The
# exact times come from a scripted clock.
SLACK_TTFT_S, SLACK_TPOT_S = 1.0, 0.5


def spec(prompt: str = "Hello", max_tokens: int = 6) -> RequestSpec:
    return RequestSpec(index=0, prompt=prompt, prompt_tokens=2, max_tokens=max_tokens, category="fixed")


async def send(client: Any, request: RequestSpec) -> RequestRecord:
    """Send one request as the runner does, timing from now."""
    start = time.monotonic()
    record = RequestRecord(request.index, 0.0, 0.0, request.prompt_tokens, request.max_tokens)
    await client.send(request, record, lambda: time.monotonic() - start)
    return record


async def send_on_script(client: Any, request: RequestSpec) -> RequestRecord:
    """Send one request with a scripted clock: its i-th reading (from 0) is TTFT_S + i * ITL_S."""
    readings = iter(range(1_000_000))
    record = RequestRecord(request.index, 0.0, 0.0, request.prompt_tokens, request.max_tokens)
    await client.send(request, record, lambda: TTFT_S + next(readings) * ITL_S)
    return record


def ttft_and_tpot(record: RequestRecord) -> tuple[float, float]:
    first, last = record.chunks[0].t, record.chunks[-1].t
    return first - record.sent_s, (last - first) / (record.output_tokens - 1)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


# ------------------------------------------------------------------------------- targets


@pytest.mark.parametrize(("target", "kind", "base_url"), [
    ("grpc://localhost:50051", GrpcClient, None),
    ("http://h:8000", OpenAIClient, "http://h:8000/v1"),
    ("http://h:8000/v1/", OpenAIClient, "http://h:8000/v1"),
    ("https://api.example.com/openai/v1", OpenAIClient, "https://api.example.com/openai/v1"),
])
def test_targets(target: str, kind: type, base_url: str | None):
    client = make_client(target)
    assert isinstance(client, kind) and client.target == target
    if base_url is not None:
        assert client._base_url == base_url


@pytest.mark.parametrize("target", ["localhost:50051", "grpc://localhost", "ftp://h:1", "http://", "grpc://h:1/x"])
def test_bad_targets_say_what_a_target_is(target: str):
    with pytest.raises(ValueError, match=r"target must be grpc://HOST:PORT or http\(s\)://HOST:PORT/v1"):
        make_client(target)


def test_unreachable_servers_are_a_sentence():
    async def check() -> None:
        for target in ("grpc://127.0.0.1:1", "http://127.0.0.1:1/v1"):
            with pytest.raises(TargetError, match="cannot reach"):
                async with make_client(target, timeout_s=0.5):
                    pass

    run(check)


# ------------------------------------------------------------------------------- gRPC


async def with_grpc(service: Service, body: Callable[[Any], Awaitable[None]], **options: Any) -> None:
    server, port = await start_grpc(service)
    try:
        async with make_client(f"grpc://127.0.0.1:{port}", **options) as client:
            await body(client)
    finally:
        await server.stop(0)


def test_grpc_client_pins_k_and_keeps_each_requests_output_tokens():
    from splitserve.loadtest.clients import GrpcClient

    async def main() -> list[list[int]]:
        server, port = await start_grpc(Service(ttft_s=0.0, itl_s=0.0))
        try:
            address = f"127.0.0.1:{port}"
            async with GrpcClient(f"grpc://{address}", address, model=None, timeout_s=30, slo_ttft_ms=None,
                                  slo_tpot_ms=None, num_speculative_tokens=3, keep_outputs=True) as client:
                for index, max_tokens in ((0, 2), (2, 4)):
                    record = RequestRecord(index, 0.0, 0.0, 5, max_tokens)
                    await client.send(RequestSpec(index, "hello", 5, max_tokens), record, time.monotonic)
                return client.take_outputs(3) + client.take_outputs(1)
        finally:
            await server.stop(0)

    assert asyncio.run(main()) == [[3, 3], [], [3, 3, 3, 3], []]


def test_grpc_times_match_the_service_and_keep_the_report():
    service = Service(ttft_s=TTFT_S, itl_s=ITL_S)

    async def check(client: Any) -> None:
        record = await send(client, spec(max_tokens=8))
        ttft, tpot = ttft_and_tpot(record)
        assert TTFT_S <= ttft < TTFT_S + SLACK_TTFT_S and tpot < ITL_S + SLACK_TPOT_S
        assert record.chunks[-1].t - record.sent_s >= TTFT_S + 7 * ITL_S  # 7 sleeps after the first token
        assert [c.tokens for c in record.chunks] == [1] * 8
        assert record.server == {
            "prefill_worker": "prefill-0", "decode_worker": "decode-0", "k_history": [3, 2], "draft_tokens": 6,
            "accepted_tokens": 4, "queue_s": 0.001, "prefill_s": 0.05, "transfer_s": 0.002, "decode_s": 0.1,
            "handoff_attempts": 1, "placement": "", "predicted_ttft_s": 0.0, "predicted_tpot_s": 0.0,
            "ttft_s": 0.0, "tpot_s": 0.0, "migrations": 0, "prompt_tokens": 5, "finish_reason": "length"}
        # Each message is timed by one clock reading as it arrives: exactly the service's times.
        scripted = await send_on_script(client, spec(max_tokens=8))
        assert [c.t for c in scripted.chunks] == pytest.approx([TTFT_S + i * ITL_S for i in range(8)])
        assert ttft_and_tpot(scripted) == pytest.approx((TTFT_S, ITL_S))

    run(lambda: with_grpc(service, check))
    request = service.bodies[0]
    assert (request.prompt, request.max_tokens, request.temperature, request.ignore_eos) == ("Hello", 8, 0.0, True)
    assert not request.HasField("slo")  # only sent when asked: other servers' limits differ


def test_grpc_counts_several_tokens_per_message_and_sends_the_slo_when_asked():
    service = Service(ttft_s=0.0, itl_s=ITL_S, tokens_per_chunk=3)

    async def check(client: Any) -> None:
        record = await send(client, spec(max_tokens=8))
        assert [c.tokens for c in record.chunks] == [1, 3, 3, 1]

    run(lambda: with_grpc(service, check, slo_ttft_ms=500, slo_tpot_ms=40, model="m"))
    request = service.bodies[0]
    assert (request.slo.ttft_ms, request.slo.tpot_ms, request.model) == (500, 40, "m")


@pytest.mark.parametrize(("prompt", "capacity", "status", "message", "num_chunks"), [
    ("Hello", 0, "refused", "RESOURCE_EXHAUSTED: no decode worker has free KV blocks", 0),
    ("FAIL", None, "failed", "UNAVAILABLE: prefill-0 died", 0),
    ("MIDFAIL", None, "failed", "UNAVAILABLE: decode-1 died", 1),
])
def test_grpc_refusals_and_failures(prompt: str, capacity: int | None, status: str, message: str, num_chunks: int):
    check = expect_failure(prompt, status, message, num_chunks)
    run(lambda: with_grpc(Service(ttft_s=0.0, itl_s=0.0, capacity=capacity), check))


def expect_failure(prompt: str, status: str, message: str, num_chunks: int) -> Callable[[Any], Awaitable[None]]:
    """A check that sending prompt raises RequestFailed(status, message) after num_chunks chunks."""
    async def check(client: Any) -> None:
        record = RequestRecord(0, 0.0, 0.0, 2, 6)
        with pytest.raises(RequestFailed) as info:
            await client.send(spec(prompt), record, time.monotonic)
        assert (info.value.status, str(info.value)) == (status, message)
        assert len(record.chunks) == num_chunks

    return check


# ------------------------------------------------------------------------------- HTTP


async def with_http(server: StandInOpenAI, body: Callable[[Any], Awaitable[None]], **options: Any) -> None:
    port = await server.start()
    try:
        async with make_client(f"http://127.0.0.1:{port}", **options) as client:
            await body(client)
    finally:
        await server.stop()


@pytest.mark.parametrize("continuous_usage", [True, False])
def test_http_times_and_token_counts(continuous_usage: bool):
    service = Service(ttft_s=TTFT_S, itl_s=ITL_S, tokens_per_chunk=2)

    async def check(client: Any) -> None:
        assert client.model == MODEL  # the first of GET /v1/models
        record = await send(client, spec(max_tokens=8))
        ttft, tpot = ttft_and_tpot(record)
        assert TTFT_S <= ttft < TTFT_S + SLACK_TTFT_S and tpot < ITL_S / 2 + SLACK_TPOT_S
        assert record.chunks[-1].t - record.sent_s >= TTFT_S + 4 * ITL_S  # 4 sleeps, 2 tokens each but the last
        # Without continuous usage every chunk counts 1 and the final usage corrects the total.
        expected = [1, 2, 2, 2, 1] if continuous_usage else [1, 1, 1, 1, 4]
        assert [c.tokens for c in record.chunks] == expected
        # Each event is timed by one clock reading as it arrives (the usage event's is unused).
        scripted = await send_on_script(client, spec(max_tokens=8))
        assert [c.t for c in scripted.chunks] == pytest.approx([TTFT_S + i * ITL_S for i in range(5)])
        assert [c.tokens for c in scripted.chunks] == expected
        assert ttft_and_tpot(scripted) == pytest.approx((TTFT_S, 4 * ITL_S / 7))

    run(lambda: with_http(StandInOpenAI(service, continuous_usage), check))
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    assert service.bodies == [body, body]


def test_http_sends_the_model_and_slo_given():
    service = Service(ttft_s=0.0, itl_s=0.0)

    async def check(client: Any) -> None:
        await send(client, spec(max_tokens=2))

    run(lambda: with_http(StandInOpenAI(service), check, model="m", slo_ttft_ms=500, slo_tpot_ms=40))
    assert {k: service.bodies[0][k] for k in ("model", "slo_ttft_ms", "slo_tpot_ms")} == {
        "model": "m", "slo_ttft_ms": 500, "slo_tpot_ms": 40}


@pytest.mark.parametrize(("prompt", "capacity", "status", "message", "num_chunks"), [
    ("Hello", 0, "refused", "HTTP 429: no capacity", 0),
    ("FAIL", None, "failed", "HTTP 503: prefill-0 died", 0),
    ("MIDFAIL", None, "failed", "decode-1 died", 1),
])
def test_http_refusals_and_failures(prompt: str, capacity: int | None, status: str, message: str, num_chunks: int):
    check = expect_failure(prompt, status, message, num_chunks)
    run(lambda: with_http(StandInOpenAI(Service(ttft_s=0.0, itl_s=0.0, capacity=capacity)), check))


class PacedFrontend:
    """A splitserve Frontend that streams max_tokens deltas of one token, ITL_S apart, the last
    with a report; or raises fail_with before the first."""

    model_name = "paced"

    def __init__(self, fail_with: Exception | None = None):
        self.fail_with = fail_with

    def is_ready(self) -> bool:
        return True

    async def generate(self, request: GenerateInput) -> AsyncIterator[GenerateDelta]:
        if self.fail_with is not None:
            raise self.fail_with
        n = request.params.max_tokens
        for i in range(1, n + 1):
            await asyncio.sleep(ITL_S)
            report = RequestReport(decode_worker="colocated-0", k_history=(2,)) if i == n else None
            yield GenerateDelta("r", [7], "x", i == n, "length" if i == n else None, 5, i, report=report)


async def start_front_end(kind: str, frontend: PacedFrontend) -> tuple[str, Callable[[], Awaitable[None]]]:
    """splitserve's gRPC or HTTP front end over frontend: its target and its stop."""
    server = GrpcServer(frontend) if kind == "grpc" else HttpServer(frontend)
    port = await server.start("127.0.0.1", 0)
    target = f"grpc://127.0.0.1:{port}" if kind == "grpc" else f"http://127.0.0.1:{port}/v1"
    return target, lambda: server.stop(0)


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_splitserves_own_front_ends(kind: str):
    async def check() -> None:
        target, stop = await start_front_end(kind, PacedFrontend())
        try:
            async with make_client(target) as client:
                record = await send(client, spec(max_tokens=5))
        finally:
            await stop()
        assert [c.tokens for c in record.chunks] == [1] * 5  # HTTP: from the continuous usage
        # The report reaches the record the same way over both (HTTP: the last chunk's splitserve_report).
        assert (record.server["decode_worker"], record.server["k_history"]) == ("colocated-0", [2])
        assert record.server["finish_reason"] == "length"

    run(check)


@pytest.mark.parametrize(("kind", "message", "hint", "retry_after_s"), [
    ("grpc", "RESOURCE_EXHAUSTED: no worker can meet the TTFT SLO", None, None),
    ("grpc", "RESOURCE_EXHAUSTED: no worker can meet the TTFT SLO", 1.2, 1.2),  # grpc-retry-pushback-ms
    ("http", "HTTP 429: no worker can meet the TTFT SLO", None, None),
    ("http", "HTTP 429: no worker can meet the TTFT SLO", 1.2, 2.0),  # Retry-After, whole seconds
])
def test_splitserves_refusals_are_refused(kind: str, message: str, hint: float | None, retry_after_s: float | None):
    async def check() -> None:
        refusal = CapacityError("no worker can meet the TTFT SLO", retry_after_s=hint)
        target, stop = await start_front_end(kind, PacedFrontend(refusal))
        try:
            async with make_client(target, model="paced") as client:
                with pytest.raises(RequestFailed) as info:
                    await send(client, spec())
        finally:
            await stop()
        assert (info.value.status, str(info.value), info.value.retry_after_s) == ("refused", message, retry_after_s)

    run(check)


@pytest.mark.parametrize(("counts", "total", "expected"), [
    ([1, 1, 1], 3, [1, 1, 1]),
    ([1, 1, 1], 5, [1, 1, 3]),
    ([1, 1, 1], 2, [1, 1]),      # one chunk too many: the last one had no token
    ([1, 2, 1], 1, [1]),
])
def test_with_total_corrects_the_last_chunks(counts: list[int], total: int, expected: list[int]):
    chunks = [Chunk(float(i), n) for i, n in enumerate(counts)]
    fixed = with_total(chunks, total)
    assert [c.tokens for c in fixed] == expected and [c.t for c in fixed] == [float(i) for i in range(len(expected))]
