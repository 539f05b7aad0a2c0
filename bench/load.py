"""The benchmarks' side of splitserve.loadtest: every load a benchmark sends goes through the
library's runner and is scored by splitserve/loadtest/metrics.py (TTFT, TPOT, attainment,
goodput), so bench/ and ``splitserve loadtest`` count the same way.

``bench_client`` gives the library's gRPC client with every request's k pinned
(``num_speculative_tokens``; None lets the router choose) and each request's output token ids
kept for the benchmarks' greedy-output checks. Prompts go as text, as the library sends them;
the server tokenizes them.
"""

from __future__ import annotations

from splitserve.loadtest.arrivals import Arrival
from splitserve.loadtest.clients import GrpcClient
from splitserve.loadtest.metrics import GOODPUT_ATTAINMENT, RequestMetrics, goodput, request_metrics
from splitserve.loadtest.records import RequestRecord, RequestSpec
from splitserve.loadtest.runner import run

CONNECT_TIMEOUT_S = 30.0
POISSON = Arrival("poisson")
ONE_AT_A_TIME = Arrival("concurrency", concurrency=1)


def bench_client(address: str, num_speculative_tokens: int | None = None) -> GrpcClient:
    """The library's gRPC client for a benchmark: k pinned (None: the router chooses), output
    token ids kept. Enter it (``async with``) before a run."""
    return GrpcClient(f"grpc://{address}", address, model=None, timeout_s=CONNECT_TIMEOUT_S, slo_ttft_ms=None,
                      slo_tpot_ms=None, num_speculative_tokens=num_speculative_tokens, keep_outputs=True)


async def send_alone(client: GrpcClient, spec: RequestSpec) -> RequestMetrics:
    """One request with nothing else in flight, through the library's runner; its metrics.
    RuntimeError when it did not complete."""
    record = (await run(client, [spec], ONE_AT_A_TIME, None)).records[0]
    metrics = request_metrics(record)
    if metrics is None:
        raise RuntimeError(f"request {spec.index} ({spec.prompt_tokens} prompt tokens) {record.status}: "
                           f"{record.error}")
    return metrics


async def send_together(client: GrpcClient, specs: list[RequestSpec]) -> list[RequestRecord]:
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
