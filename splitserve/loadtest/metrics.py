"""Scoring a load test: per-request latencies, SLO attainment, run summaries and goodput.

Definitions are those of vLLM's ``bench serve`` and DistServe (docs/loadtest.md, "Metrics"):
TTFT = first token - sent; TPOT = (last token - first token) / (output tokens - 1), 0 for one
token; ITL = the gaps between consecutive chunks that carry tokens; E2E = last token - sent.
A request is scored ("ok") when its stream ended normally with at least one token; a stream
that ended normally with none counts as failed. Refused and failed requests are SLO misses.

Everything here is a pure function of `RequestRecord`s, so saved JSONL results can be
re-scored under other SLOs (`rescore`, `scaled_slos`) without running again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitserve.loadtest.records import RequestRecord, Status

SUMMARY_SCHEMA = "splitserve.loadtest.summary/1"
SWEEP_SCHEMA = "splitserve.loadtest.sweep/1"
GOODPUT_ATTAINMENT = 0.9  # DistServe's bar: goodput is the highest rate with >= 90% attainment
EMPTY_STREAM_ERROR = "the stream ended without any token"


@dataclass(frozen=True)
class SLO:
    """Latency bounds in milliseconds; None leaves that metric unbounded."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name, value in (("ttft_ms", self.ttft_ms), ("tpot_ms", self.tpot_ms)):
            if value is not None and not value > 0:
                raise ValueError(f"an SLO bound must be > 0 ms or unset, got {name}={value}")

    def scaled(self, factor: float) -> SLO:
        """Both bounds multiplied by factor (DistServe's "SLO scale")."""
        if not factor > 0:
            raise ValueError(f"an SLO scale factor must be > 0, got {factor}")
        return SLO(_times(self.ttft_ms, factor), _times(self.tpot_ms, factor))

    def to_dict(self) -> dict[str, float | None]:
        return {"tpot_ms": self.tpot_ms, "ttft_ms": self.ttft_ms}


def _times(bound: float | None, factor: float) -> float | None:
    return None if bound is None else bound * factor


def scaled_slos(base: SLO, factors: list[float]) -> list[SLO]:
    """base scaled by each factor, in order: the SLOs of an slo-scale experiment."""
    return [base.scaled(factor) for factor in factors]


@dataclass(frozen=True)
class RequestMetrics:
    """The latencies of one scored request, in seconds."""

    ttft_s: float
    tpot_s: float
    itl_s: tuple[float, ...]  # gaps between consecutive token-carrying chunks; sum == e2e_s - ttft_s
    e2e_s: float
    output_tokens: int


def outcome(record: RequestRecord) -> Status:
    """ok, refused or failed for scoring: an ok stream that carried no token is failed."""
    if record.status == "ok" and record.output_tokens == 0:
        return "failed"
    return record.status


def request_metrics(record: RequestRecord) -> RequestMetrics | None:
    """TTFT, TPOT, ITL and E2E of an ok request; None for refused and failed ones."""
    if outcome(record) != "ok":
        return None
    times = [chunk.t for chunk in record.chunks if chunk.tokens > 0]
    num_tokens = record.output_tokens
    return RequestMetrics(
        ttft_s=times[0] - record.sent_s,
        tpot_s=(times[-1] - times[0]) / (num_tokens - 1) if num_tokens > 1 else 0.0,
        itl_s=tuple(np.diff(times).tolist()),
        e2e_s=times[-1] - record.sent_s,
        output_tokens=num_tokens,
    )


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    """Whether the request was ok and met both bounds."""
    metrics = request_metrics(record)
    return metrics is not None and _meets_ttft(metrics, slo) and _meets_tpot(metrics, slo)


def _meets_ttft(metrics: RequestMetrics, slo: SLO) -> bool:
    return slo.ttft_ms is None or metrics.ttft_s * 1e3 <= slo.ttft_ms


def _meets_tpot(metrics: RequestMetrics, slo: SLO) -> bool:
    return slo.tpot_ms is None or metrics.tpot_s * 1e3 <= slo.tpot_ms


def rescore(records: Iterable[RequestRecord], slo: SLO) -> dict[str, Any]:
    """The SLO and the shares of all requests meeting it: both bounds (joint), TTFT's, TPOT's.
    Shares are None when there are no requests."""
    scored = list(map(request_metrics, records))
    ok = [metrics for metrics in scored if metrics is not None]
    return {
        "attainment": {
            "joint": _share(sum(_meets_ttft(m, slo) and _meets_tpot(m, slo) for m in ok), len(scored)),
            "tpot": _share(sum(_meets_tpot(m, slo) for m in ok), len(scored)),
            "ttft": _share(sum(_meets_ttft(m, slo) for m in ok), len(scored)),
        },
        "slo": slo.to_dict(),
    }


def _share(count: int, total: int) -> float | None:
    return count / total if total else None


def summarize(
    records: Iterable[RequestRecord],
    slo: SLO,
    *,
    target_rate: float | None,
    duration_s: float | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One run's summary (schema SUMMARY_SCHEMA): outcome counts and error sentences, latency
    statistics in ms over ok requests (ITL over all their gaps), attainment, request rates
    (target; sent: over the span of sends; completed: ok requests per second of the run),
    output tokens per second, the SLO and `meta` as given. The run lasts `duration_s`, or by
    default from the first send to the last stream's end. Missing values are None, never NaN."""
    records = list(records)
    ok = [m for m in map(request_metrics, records) if m is not None]
    duration = duration_s if duration_s is not None else _span(records)
    summary = {
        "schema": SUMMARY_SCHEMA,
        "counts": _counts(records),
        "errors": dict(Counter(_error(r) for r in records if outcome(r) != "ok")),
        "latency_ms": {
            "e2e": _stats_ms([m.e2e_s for m in ok]),
            "itl": _stats_ms([gap for m in ok for gap in m.itl_s]),
            "tpot": _stats_ms([m.tpot_s for m in ok]),
            "ttft": _stats_ms([m.ttft_s for m in ok]),
        },
        "duration_s": duration,
        "request_rate": {"completed": _per_s(len(ok), duration), "sent": _sent_rate(records), "target": target_rate},
        "output_tokens_per_s": _per_s(sum(m.output_tokens for m in ok), duration),
        "meta": meta or {},
        **rescore(records, slo),
    }
    return _sorted_keys(summary)


def _counts(records: list[RequestRecord]) -> dict[str, int]:
    counts = Counter(outcome(record) for record in records)
    return {"failed": counts["failed"], "ok": counts["ok"], "refused": counts["refused"], "total": len(records)}


def _error(record: RequestRecord) -> str:
    if record.status == "ok":
        return EMPTY_STREAM_ERROR
    return record.error or f"{record.status} (no message)"


def _stats_ms(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ms = np.asarray(values_s) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99]).tolist()
    return {"mean": float(ms.mean()), "p50": p50, "p90": p90, "p99": p99}


def _end(record: RequestRecord) -> float:
    if record.finished_s is not None:
        return record.finished_s
    return record.chunks[-1].t if record.chunks else record.sent_s


def _span(records: list[RequestRecord]) -> float | None:
    if not records:
        return None
    return max(map(_end, records)) - min(record.sent_s for record in records)


def _per_s(count: float, duration: float | None) -> float | None:
    return count / duration if duration else None


def _sent_rate(records: list[RequestRecord]) -> float | None:
    """Requests sent per second between the first and the last send: below the target when the
    client fell behind its schedule."""
    sends = [record.sent_s for record in records]
    return _per_s(len(sends) - 1, max(sends) - min(sends)) if len(sends) > 1 else None


def _sorted_keys(data: dict[str, Any]) -> dict[str, Any]:
    """data with the keys of every dict in it (nested ones, and those inside lists, too) in sorted order."""
    return {key: _sorted_value(data[key]) for key in sorted(data)}


def _sorted_value(value: Any) -> Any:
    if isinstance(value, dict):
        return _sorted_keys(value)
    if isinstance(value, list):
        return [_sorted_value(item) for item in value]
    return value


def goodput(points: list[tuple[float, float]], threshold: float = GOODPUT_ATTAINMENT) -> float | None:
    """DistServe goodput from (request rate, attainment) points, in any order.

    The highest measured rate whose attainment is >= threshold, moved toward the next (failing)
    rate above it by linear interpolation of attainment. A dip below the threshold at a lower
    rate (noise) does not count against a higher rate that passes. Edge cases: when the highest
    rate passes, goodput is that rate, a lower bound (`sweep_summary` marks it); when no rate
    passes, None (goodput is below the lowest rate measured, which says nothing more).
    """
    ordered = sorted(points)
    passing = [index for index, (_, attainment) in enumerate(ordered) if attainment >= threshold]
    if not passing:
        return None
    last = passing[-1]
    rate, attainment = ordered[last]
    if last == len(ordered) - 1:
        return rate
    next_rate, next_attainment = ordered[last + 1]
    return rate + (next_rate - rate) * (attainment - threshold) / (attainment - next_attainment)


def sweep_summary(
    runs: list[dict[str, Any]], threshold: float = GOODPUT_ATTAINMENT, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Summary of runs of one system at several target rates (schema SWEEP_SCHEMA): each rate's
    attainment and latencies, the goodput, and whether it is only a lower bound (every rate up to
    the highest passed). The runs must share one SLO and have target rates (open loop)."""
    if not runs:
        raise ValueError("a sweep needs at least one run")
    slos = {tuple(sorted(run["slo"].items())) for run in runs}
    if len(slos) > 1:
        raise ValueError(f"the runs of a sweep must share one SLO, got {len(slos)} different ones")
    points = sorted((_sweep_point(run) for run in runs), key=lambda point: point["rate_rps"])
    rates = [(point["rate_rps"], point["attainment"]) for point in points]
    return _sorted_keys({
        "schema": SWEEP_SCHEMA,
        "threshold": threshold,
        "slo": runs[0]["slo"],
        "points": points,
        "goodput_rps": goodput(rates, threshold),
        "goodput_is_lower_bound": rates[-1][1] >= threshold,
        "meta": meta or {},
    })


def _sweep_point(run: dict[str, Any]) -> dict[str, Any]:
    rate, attainment = run["request_rate"]["target"], run["attainment"]
    if rate is None or attainment["joint"] is None:
        raise ValueError("every run of a sweep needs a target rate (open loop) and at least one request")
    return {
        "attainment": attainment["joint"],
        "completed_rps": run["request_rate"]["completed"],
        "rate_rps": rate,
        "tpot_attainment": attainment["tpot"],
        "tpot_p90_ms": run["latency_ms"]["tpot"]["p90"],
        "ttft_attainment": attainment["ttft"],
        "ttft_p90_ms": run["latency_ms"]["ttft"]["p90"],
    }
