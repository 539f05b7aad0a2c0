"""Metrics: observe_stream's timings, token counts and outcomes from scripted streams on a scripted
clock; the router's setters; separate registries; the gRPC front end recording into Metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.errors import CapacityError, ServingError
from splitserve.protocol import GenerateDelta
from splitserve.router.api import GenerateInput
from splitserve.router.client import GenerationClient, make_request
from splitserve.router.grpc_server import GrpcServer
from splitserve.router.metrics import OUTCOMES, Metrics, observe_stream, outcome_for_error
from tests.unit.frontend_helpers import MODEL_NAME, LoopThread


class Clock:
    """Time stands still until a test moves it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What /metrics shows, parsed back, by (sample name, sorted labels)."""
    text = metrics.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


def delta(num_output_tokens: int, finish_reason: str | None = None, *, drafts: int = 0,
          accepted: int = 0) -> GenerateDelta:
    return GenerateDelta("r", [7], "x", finish_reason is not None, finish_reason, num_prompt_tokens=5,
                         num_output_tokens=num_output_tokens, num_draft_tokens=drafts, num_accepted_tokens=accepted)


async def scripted(clock: Clock, steps: list[tuple[float, GenerateDelta]], error: Exception | None = None,
                   closed: list[bool] | None = None) -> AsyncIterator[GenerateDelta]:
    """Yields each delta after moving the clock by its seconds, then raises ``error`` if given."""
    try:
        for seconds, d in steps:
            clock.now += seconds
            yield d
        if error is not None:
            raise error
    finally:
        if closed is not None:
            closed.append(True)


def drain(stream: AsyncIterator[GenerateDelta]) -> list[GenerateDelta]:
    async def run() -> list[GenerateDelta]:
        return [d async for d in stream]

    return asyncio.run(run())


def test_a_finished_stream_records_ttft_tpot_e2e_tokens_and_speculation():
    clock = Clock()
    metrics = Metrics(clock=clock)
    steps = [(0.25, delta(1)), (0.1, delta(3, drafts=4, accepted=2)), (0.1, delta(5, "length", drafts=8, accepted=3))]
    deltas = drain(observe_stream(metrics, scripted(clock, steps)))
    assert deltas == [d for _, d in steps]
    assert value(metrics, "splitserve_time_to_first_token_seconds_sum") == pytest.approx(0.25)
    assert value(metrics, "splitserve_time_to_first_token_seconds_bucket", le="0.25") == 1
    assert value(metrics, "splitserve_time_to_first_token_seconds_bucket", le="0.1") == 0
    assert value(metrics, "splitserve_time_per_output_token_seconds_sum") == pytest.approx(0.2 / 4)
    assert value(metrics, "splitserve_e2e_request_latency_seconds_sum") == pytest.approx(0.45)
    assert value(metrics, "splitserve_requests_total", outcome="finished") == 1
    assert value(metrics, "splitserve_prompt_tokens_total") == 5
    assert value(metrics, "splitserve_generation_tokens_total") == 5
    assert value(metrics, "splitserve_spec_draft_tokens_total") == 8
    assert value(metrics, "splitserve_spec_accepted_tokens_total") == 3


def test_the_clock_starts_when_the_stream_is_observed_not_when_it_is_first_read():
    clock = Clock()
    metrics = Metrics(clock=clock)
    stream = observe_stream(metrics, scripted(clock, [(0.0, delta(1, "stop"))]))
    clock.now += 2.0  # the front end took this long to start reading
    drain(stream)
    assert value(metrics, "splitserve_time_to_first_token_seconds_sum") == pytest.approx(2.0)
    assert value(metrics, "splitserve_time_per_output_token_seconds_count") == 0  # one token: no TPOT


@pytest.mark.parametrize(("error", "outcome"), [
    (ValueError("prompt must not be empty"), "invalid"),
    (CapacityError("no free blocks"), "refused"),
    (ServingError("decode-1 died"), "failed"),
    (ZeroDivisionError("a bug"), "failed"),
])
def test_an_error_counts_its_outcome_and_passes_through(error: Exception, outcome: str):
    clock = Clock()
    metrics = Metrics(clock=clock)
    with pytest.raises(type(error)):
        drain(observe_stream(metrics, scripted(clock, [], error)))
    assert outcome_for_error(error) == outcome
    assert {o: value(metrics, "splitserve_requests_total", outcome=o) for o in OUTCOMES} == {
        o: float(o == outcome) for o in OUTCOMES}
    assert value(metrics, "splitserve_time_to_first_token_seconds_count") == 0


def test_closing_early_counts_aborted_and_closes_the_inner_stream():
    clock = Clock()
    metrics = Metrics(clock=clock)
    closed: list[bool] = []

    async def read_one() -> None:
        stream = observe_stream(metrics, scripted(clock, [(0.5, delta(1)), (0.1, delta(2))], closed=closed))
        await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]

    asyncio.run(read_one())
    assert closed == [True]
    assert value(metrics, "splitserve_requests_total", outcome="aborted") == 1
    assert value(metrics, "splitserve_time_to_first_token_seconds_count") == 1
    assert value(metrics, "splitserve_e2e_request_latency_seconds_count") == 0


def test_closing_after_the_finished_delta_still_counts_finished():
    clock = Clock()
    metrics = Metrics(clock=clock)

    async def read_one() -> None:
        stream = observe_stream(metrics, scripted(clock, [(0.1, delta(1, "stop"))]))
        await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]

    asyncio.run(read_one())
    assert value(metrics, "splitserve_requests_total", outcome="finished") == 1


def test_an_abort_finish_reason_and_a_stream_cut_short_count_aborted():
    clock = Clock()
    metrics = Metrics(clock=clock)
    drain(observe_stream(metrics, scripted(clock, [(0.1, delta(1)), (0.1, delta(2, "abort"))])))
    drain(observe_stream(metrics, scripted(clock, [(0.1, delta(1))])))
    assert value(metrics, "splitserve_requests_total", outcome="aborted") == 2
    assert value(metrics, "splitserve_e2e_request_latency_seconds_count") == 0


def test_without_metrics_the_stream_is_returned_as_is():
    stream = scripted(Clock(), [])
    assert observe_stream(None, stream) is stream


def test_router_setters_and_count_error():
    metrics = Metrics()
    metrics.set_queue(3, 7)
    metrics.set_worker_blocks("decode-0", 40, 256)
    metrics.set_worker_blocks("decode-1", 0, 128)
    metrics.observe_transfer(1 << 20, 0.02)
    metrics.observe_transfer(1 << 20, 0.04)
    for k in (0, 2, 2, 4):
        metrics.observe_k(k)
    metrics.count_error(ValueError("bad json"))
    metrics.remove_worker("decode-1")
    metrics.remove_worker("never-seen")
    got = samples(metrics)
    assert got[("splitserve_requests_running", ())] == 3 and got[("splitserve_requests_waiting", ())] == 7
    assert got[("splitserve_kv_blocks_used", (("worker", "decode-0"),))] == 40
    assert got[("splitserve_kv_blocks_total", (("worker", "decode-0"),))] == 256
    assert ("splitserve_kv_blocks_used", (("worker", "decode-1"),)) not in got
    assert got[("splitserve_kv_transfer_bytes_total", ())] == 2 << 20
    assert got[("splitserve_kv_transfer_seconds_sum", ())] == pytest.approx(0.06)
    assert got[("splitserve_speculation_k_bucket", (("le", "2.0"),))] == 3
    assert got[("splitserve_speculation_k_count", ())] == 4
    assert got[("splitserve_requests_total", (("outcome", "invalid"),))] == 1


def test_each_metrics_has_its_own_registry():
    first, second = Metrics(), Metrics()
    first.count_error(CapacityError("full"))
    assert value(first, "splitserve_requests_total", outcome="refused") == 1
    assert value(second, "splitserve_requests_total", outcome="refused") == 0


# ------------------------------------------------------------- the gRPC front end


class TwoTokens:
    """A Frontend that answers every request with two tokens."""

    model_name = MODEL_NAME

    def is_ready(self) -> bool:
        return True

    async def generate(self, request: GenerateInput) -> AsyncIterator[GenerateDelta]:
        yield GenerateDelta("r", [1], "a", num_prompt_tokens=2, num_output_tokens=1)
        yield GenerateDelta("r", [2], "b", True, "length", num_prompt_tokens=2, num_output_tokens=2)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


def test_grpc_server_records_into_metrics(loop_thread: LoopThread):
    metrics = Metrics()
    server = GrpcServer(TwoTokens(), metrics=metrics)
    port = loop_thread.run(server.start("127.0.0.1", 0))
    try:
        with GenerationClient(f"127.0.0.1:{port}") as client:
            assert "".join(r.text for r in client.generate(make_request("Hi"))) == "ab"
            with pytest.raises(Exception, match="top_p"):
                list(client.generate(make_request("Hi", top_p=0.0)))
    finally:
        loop_thread.run(server.stop(0))
    assert value(metrics, "splitserve_requests_total", outcome="finished") == 1
    assert value(metrics, "splitserve_requests_total", outcome="invalid") == 1
    assert value(metrics, "splitserve_time_to_first_token_seconds_count") == 1
    assert value(metrics, "splitserve_generation_tokens_total") == 2
