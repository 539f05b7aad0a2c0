"""The load test runner against the stand-in gRPC server (tests/unit/loadtest_servers.py), whose
service times and capacity make the right answers computable: open and closed loops end by
themselves (request count, duration + drain, per-request deadline), and the SLO attainment and
goodput they measure are the expected ones.

Exact times, attainments and refusals come from the same Service served in process on virtual
time (``InProcessClient``, ``run_on_virtual_time``), so they do not depend on the machine's
speed; against the real server the checks are only those a slow or busy machine cannot flip
(sleeps never wake early, a request sent while the server is busy is refused)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from splitserve.loadtest import runner
from splitserve.loadtest.arrivals import parse_arrival
from splitserve.loadtest.clients import make_client
from splitserve.loadtest.metrics import SLO, goodput, summarize
from splitserve.loadtest.records import RequestRecord, RequestSpec, read_jsonl
from splitserve.loadtest.runner import RunResult, RunSetup, bracket, run, search, sweep
from tests.unit.loadtest_servers import InProcessClient, Service, run_on_virtual_time, start_grpc


def specs(num: int, prompt: str = "Hello", max_tokens: int = 4) -> list[RequestSpec]:
    return [RequestSpec(i, prompt, 2, max_tokens, "fixed") for i in range(num)]


def serve(service: Service, body: Callable[[Any], Awaitable[Any]]) -> Any:
    """body(client) against a stand-in gRPC server, in a fresh event loop."""

    async def main() -> Any:
        server, port = await start_grpc(service)
        try:
            async with make_client(f"grpc://127.0.0.1:{port}") as client:
                return await body(client)
        finally:
            await server.stop(0)

    return asyncio.run(asyncio.wait_for(main(), 30))


def timed_run(service: Service, requests: list[RequestSpec], arrival: str, rate: float | None = None,
              **options: Any) -> tuple[RunResult, float]:
    """A run and its wall time."""
    start = time.monotonic()
    result = serve(service, lambda client: run(client, requests, parse_arrival(arrival), rate, **options))
    return result, time.monotonic() - start


@pytest.fixture
def on_loop_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """runner.run (also as sweep and search call it) timing by the running loop's clock: on a
    VirtualTimeLoop, the virtual one."""
    real_run = runner.run

    async def run_on_loop_clock(*args: Any, **options: Any) -> RunResult:
        return await real_run(*args, clock=asyncio.get_running_loop().time, **options)

    monkeypatch.setattr(runner, "run", run_on_loop_clock)


def serve_in_process(service: Service, body: Callable[[Any], Awaitable[Any]]) -> Any:
    """body(client) with service served in process, on virtual time (runs that body does not
    give the loop's clock, as sweep's and search's, need the on_loop_time fixture)."""

    async def main() -> Any:
        async with InProcessClient(service) as client:
            return await body(client)

    return run_on_virtual_time(main())


def virtual_run(service: Service, requests: list[RequestSpec], arrival: str, rate: float | None = None,
                **options: Any) -> RunResult:
    """A run of service in process, on virtual time: its times are exactly the service's."""
    return serve_in_process(service, lambda client: run(client, requests, parse_arrival(arrival), rate,
                                                        clock=asyncio.get_running_loop().time, **options))


# ------------------------------------------------------------------------- runs end


def test_an_open_loop_sends_on_schedule_and_ends_after_the_last_request():
    result, wall_s = timed_run(Service(ttft_s=0.02, itl_s=0.01), specs(10), "constant", 20.0)
    assert [r.index for r in result.records] == list(range(10))
    assert [r.status for r in result.records] == ["ok"] * 10
    assert [r.scheduled_s for r in result.records] == pytest.approx([i / 20 for i in range(10)])
    assert 0 <= result.max_lag_s < 1.0 and result.target_rate == 20.0
    assert all(r.output_tokens == 4 and r.finished_s is not None for r in result.records)
    assert 0.45 + 0.05 <= result.duration_s < wall_s < 15  # the last is sent at 0.45 and takes >= 0.05 s


def test_an_open_loop_on_virtual_time_sends_exactly_on_schedule():
    result = virtual_run(Service(ttft_s=0.02, itl_s=0.01), specs(10), "constant", 20.0)
    assert [r.status for r in result.records] == ["ok"] * 10
    assert [r.sent_s for r in result.records] == pytest.approx([i / 20 for i in range(10)], abs=1e-9)
    assert result.max_lag_s == pytest.approx(0, abs=1e-9)
    assert [c.t - r.sent_s for r in result.records for c in r.chunks] == pytest.approx(
        [0.02, 0.03, 0.04, 0.05] * 10, abs=1e-9)
    assert result.duration_s == pytest.approx(0.45 + 0.05, abs=1e-9)


def test_a_closed_loop_keeps_n_in_flight():
    service = Service(ttft_s=0.2, itl_s=0.01)  # 0.23 s each: the three overlap unless the client stalls that long
    result, _ = timed_run(service, specs(9), "concurrency:3", rate=None)
    assert [r.status for r in result.records] == ["ok"] * 9 and result.target_rate is None
    assert service.max_in_flight == 3
    assert all(r.scheduled_s == r.sent_s for r in result.records)  # a closed loop has no schedule to lag


@pytest.mark.parametrize("arrival", ["poisson", "concurrency:4"])
def test_a_duration_bounds_the_run_and_cancels_what_is_left_after_the_drain(arrival: str):
    service = Service(ttft_s=0.02, itl_s=0.02)  # each request: 2 s
    result, wall_s = timed_run(service, specs(1000, max_tokens=100), arrival, 20.0, duration_s=0.4, drain_s=0.2)
    # It ends at duration + drain (timers never fire early), not when the 2 s requests would.
    assert wall_s < 10 and 0.6 - 1e-3 <= result.duration_s < 2.6
    assert result.records and {(r.status, r.error) for r in result.records} == {("failed", "cancelled at end of run")}
    if arrival == "concurrency:4":  # each worker's first request outlives the run: it sends no second
        assert len(result.records) == 4
    else:  # none scheduled after the duration (a busy client may send late, or not at all)
        assert all(r.scheduled_s < 0.4 for r in result.records)
    assert service.in_flight == 0  # cancelling the calls aborted them on the server


@pytest.mark.parametrize("arrival", ["poisson", "concurrency:4"])
def test_on_virtual_time_a_duration_stops_sending_and_the_drain_ends_the_run(arrival: str):
    service = Service(ttft_s=0.02, itl_s=0.02)  # each request: 2 s
    result = virtual_run(service, specs(1000, max_tokens=100), arrival, 20.0, duration_s=0.4, drain_s=0.2)
    assert result.duration_s == pytest.approx(0.6, abs=1e-9)
    offsets = parse_arrival(arrival).offsets(20.0, 1000, 0) if arrival == "poisson" else [0.0] * 4
    sent = [offset for offset in offsets if offset < 0.4]
    assert [r.sent_s for r in result.records] == pytest.approx(sent, abs=1e-9) and sent
    assert {(r.status, r.error) for r in result.records} == {("failed", "cancelled at end of run")}
    assert all(r.finished_s == pytest.approx(0.6, abs=1e-9) for r in result.records)
    assert service.in_flight == 0


def test_a_hung_server_times_out_instead_of_hanging_the_run():
    service = Service()
    result, wall_s = timed_run(service, specs(3, prompt="HANG"), "constant", 100.0, timeout_s=0.2)
    assert {(r.status, r.error) for r in result.records} == {("failed", "timed out after 0.2 s")}
    assert wall_s < 10 and service.in_flight == 0


def test_an_open_loop_needs_a_rate():
    with pytest.raises(ValueError, match="needs a positive rate"):
        timed_run(Service(), specs(1), "poisson", None)


# ---------------------------------------------------------- attainment and goodput

# Capacity 1 and a service time of 0.1 s (TTFT 0.04 s, then 3 tokens 0.02 s apart), refusing what
# comes while busy: at 3 or 6 req/s (a send every 1/3 or 1/6 s) everything is served within the
# SLO; at 12 req/s (every 1/12 s) every other request is refused: 1/2 attain. Exactly so on
# virtual time; the real server only shows what no delay can flip (below).
REFUSING = {"ttft_s": 0.04, "itl_s": 0.02, "capacity": 1}
REFUSING_SLO = SLO(ttft_ms=80, tpot_ms=40)
REFUSED_MESSAGE = "RESOURCE_EXHAUSTED: no decode worker has free KV blocks"


@pytest.mark.parametrize(("rate", "num_requests", "expected"), [(6.0, 6, 1.0), (12.0, 6, 0.5)])
def test_attainment_of_a_refusing_server_at_a_rate(rate: float, num_requests: int, expected: float):
    result = virtual_run(Service(**REFUSING), specs(num_requests), "constant", rate)
    summary = summarize(result.records, REFUSING_SLO, target_rate=rate, duration_s=result.duration_s)
    assert summary["attainment"]["joint"] == pytest.approx(expected)
    refused = [r for r in result.records if r.status == "refused"]
    assert [r.index for r in refused] == (list(range(1, num_requests, 2)) if expected < 1 else [])
    assert all(r.error == REFUSED_MESSAGE for r in refused)


def test_a_refusals_retry_hint_reaches_its_record():
    result = virtual_run(Service(**REFUSING, retry_after_s=0.5), specs(4), "constant", 12.0)
    assert [(r.status, r.retry_after_s) for r in result.records] == [("ok", None), ("refused", 0.5)] * 2
    assert [RequestRecord.from_dict(r.to_dict()) for r in result.records] == result.records  # as in requests.jsonl


def test_the_real_server_refuses_when_busy_and_serves_a_low_rate():
    """End to end over gRPC, with only what no delay can flip: at 30 req/s (a send every 33 ms)
    a server busy for >= 0.1 s per request refuses some; at 1 req/s, with SLOs far above the
    service times, every request is served in time."""
    busy, _ = timed_run(Service(**REFUSING), specs(4), "constant", 30.0)
    busy_summary = summarize(busy.records, REFUSING_SLO, target_rate=30.0, duration_s=busy.duration_s)
    refused = [r for r in busy.records if r.status == "refused"]
    assert busy_summary["attainment"]["joint"] < 0.9 and refused
    assert all(r.error == REFUSED_MESSAGE for r in refused)
    calm, _ = timed_run(Service(**REFUSING), specs(3), "constant", 1.0)
    calm_summary = summarize(calm.records, SLO(ttft_ms=2000, tpot_ms=500), target_rate=1.0,
                             duration_s=calm.duration_s)
    assert calm_summary["attainment"]["joint"] == 1.0 and calm_summary["counts"]["ok"] == 3


def test_attainment_of_a_queueing_server_in_a_closed_loop():
    """Capacity 2, first come first served, 4 in flight: the first 2 requests start at once, every
    later one waits a whole service time (0.11 s) first, missing a 100 ms TTFT SLO: 2/8 attain."""
    service = Service(ttft_s=0.05, itl_s=0.02, capacity=2, queue=True)
    result = virtual_run(service, specs(8), "concurrency:4")
    summary = summarize(result.records, SLO(ttft_ms=100, tpot_ms=40), target_rate=None)
    assert summary["attainment"]["joint"] == pytest.approx(2 / 8)
    assert summary["counts"]["ok"] == 8 and service.max_in_flight == 2
    ttfts = [r.chunks[0].t - r.sent_s for r in result.records]
    assert ttfts == pytest.approx([0.05, 0.05] + [0.11 + 0.05] * 6, abs=1e-9)


def test_a_sweep_measures_the_expected_goodput(tmp_path: Path, on_loop_time: None):
    pytest.importorskip("splitserve.loadtest.plots")
    result = serve_in_process(Service(**REFUSING), lambda client: sweep(
        RunSetup(client, specs(6), parse_arrival("constant"), REFUSING_SLO, meta={"target": "stand-in"}),
        [12.0, 6.0], tmp_path))
    assert [(p["rate_rps"], p["attainment"]) for p in result["points"]] == [(6.0, 1.0), (12.0, 0.5)]
    assert result["goodput_rps"] == pytest.approx(goodput([(6.0, 1.0), (12.0, 0.5)]))
    assert json.loads((tmp_path / "sweep.json").read_text()) == result
    assert (tmp_path / "attainment.png").is_file()
    for rate in ("6", "12"):
        assert len(read_jsonl(tmp_path / f"rate-{rate}" / "requests.jsonl")) == 6
        summary = json.loads((tmp_path / f"rate-{rate}" / "summary.json").read_text())
        assert summary["meta"]["target"] == "stand-in"


def test_a_search_brackets_the_goodput(tmp_path: Path, on_loop_time: None):
    """From 3 req/s: 3 and 6 pass, 12 fails (1/2); the goodput lies between 6 and 12."""
    pytest.importorskip("splitserve.loadtest.plots")
    result = serve_in_process(Service(**REFUSING), lambda client: search(
        RunSetup(client, specs(6), parse_arrival("constant"), REFUSING_SLO), 3.0, tmp_path, steps=0))
    assert [p["rate_rps"] for p in result["points"]] == [3.0, 6.0, 12.0]
    assert [p["attainment"] for p in result["points"]] == [1.0, 1.0, 0.5]
    assert result["search"] == {"start_rate": 3.0, "steps": 0, "lower_rate": 6.0, "upper_rate": 12.0}
    assert result["goodput_rps"] == pytest.approx(goodput([(3.0, 1.0), (6.0, 1.0), (12.0, 0.5)]))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["rate-12", "rate-3", "rate-6"]


# ------------------------------------------------------------------- the search itself


def step_server(capacity_rate: float) -> tuple[Callable[[float], Awaitable[float]], list[float]]:
    """An attainment function that passes up to capacity_rate, and the rates it was asked."""
    asked: list[float] = []

    async def attainment(rate: float) -> float:
        asked.append(rate)
        return 1.0 if rate <= capacity_rate else 0.5

    return attainment, asked


@pytest.mark.parametrize(("start", "steps", "expected", "expected_asked"), [
    (1.0, 2, (6.0, 7.0), [1, 2, 4, 8, 6, 7]),  # 6 passes, 7 fails: capacity 6.5
    (20.0, 1, (5.0, 7.5), [20, 10, 5, 7.5]),   # it starts above: halve
    (1.0, 0, (4.0, 8.0), [1, 2, 4, 8]),
])
def test_bracket_doubles_then_bisects(start: float, steps: int, expected: tuple[float, float],
                                      expected_asked: list[float]):
    attainment, asked = step_server(6.5)
    assert asyncio.run(bracket(attainment, start, steps=steps)) == expected
    assert asked == expected_asked


def test_bracket_gives_up_after_max_doublings():
    attainment, asked = step_server(1e9)
    assert asyncio.run(bracket(attainment, 1.0, steps=3, max_doublings=3)) == (8.0, None)
    attainment, asked = step_server(0.0)
    assert asyncio.run(bracket(attainment, 1.0, steps=3, max_doublings=2)) == (None, 0.25)
    assert asked == [1.0, 0.5, 0.25]
