"""Load-test scoring: the timing identities of docs/loadtest.md, attainment, goodput and the summary schema.

The summary's schema is pinned by a golden file. After an intended change to `summarize`, regenerate
it with ``SPLITSERVE_REGENERATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_loadtest_metrics.py -k golden``,
bump SUMMARY_SCHEMA if a key was renamed or removed, and commit the new file with the change.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from splitserve.loadtest.metrics import (
    SLO,
    SUMMARY_SCHEMA,
    SWEEP_SCHEMA,
    goodput,
    meets_slo,
    outcome,
    request_metrics,
    rescore,
    scaled_slos,
    summarize,
    sweep_summary,
)
from splitserve.loadtest.records import Chunk, RequestRecord

GOLDEN = Path(__file__).parent / "data" / "loadtest_summary_golden.json"


def record(index: int = 0, sent: float = 1.0, chunks: list[tuple[float, int]] = (), **fields: Any) -> RequestRecord:
    return RequestRecord(
        index=index, scheduled_s=sent, sent_s=sent, prompt_tokens=fields.pop("prompt_tokens", 10),
        max_tokens=fields.pop("max_tokens", 8), chunks=[Chunk(t, n) for t, n in chunks], **fields,
    )


def test_ttft_tpot_itl_e2e_per_definition():
    m = request_metrics(record(sent=1.0, chunks=[(1.5, 1), (1.6, 1), (1.8, 1), (1.9, 1)]))
    assert m.ttft_s == pytest.approx(0.5)
    assert m.e2e_s == pytest.approx(0.9)
    assert m.tpot_s == pytest.approx((1.9 - 1.5) / 3)
    assert m.itl_s == pytest.approx((0.1, 0.2, 0.1))
    assert m.e2e_s - m.ttft_s == pytest.approx(sum(m.itl_s))  # E2E - TTFT == the gaps after the first token


def test_multi_token_chunks_count_tokens_not_chunks():
    # speculation: 3 tokens in the first chunk, then 4, then 1: TPOT divides by output tokens - 1
    m = request_metrics(record(sent=0.0, chunks=[(0.2, 3), (0.5, 4), (0.6, 1)]))
    assert m.output_tokens == 8
    assert m.tpot_s == pytest.approx((0.6 - 0.2) / 7)
    assert m.itl_s == pytest.approx((0.3, 0.1))  # one gap per pair of chunks
    assert m.e2e_s - m.ttft_s == pytest.approx(sum(m.itl_s))


def test_chunks_without_tokens_are_not_token_times():
    m = request_metrics(record(sent=0.0, chunks=[(0.1, 0), (0.3, 1), (0.4, 1), (0.9, 0)]))
    assert (m.ttft_s, m.e2e_s) == pytest.approx((0.3, 0.4))
    assert m.itl_s == pytest.approx((0.1,))


def test_one_token_output_has_zero_tpot():
    m = request_metrics(record(sent=0.0, chunks=[(0.25, 1)]))
    assert (m.ttft_s, m.tpot_s, m.e2e_s, m.itl_s) == (0.25, 0.0, 0.25, ())


def test_error_stream_is_failed_and_a_miss():
    broken = record(chunks=[(1.1, 1), (1.2, 1)], status="failed", error="stream broke")
    assert outcome(broken) == "failed"
    assert request_metrics(broken) is None
    assert not meets_slo(broken, SLO())


def test_refused_is_a_miss_and_empty_ok_stream_counts_as_failed():
    refused = record(status="refused", error="RESOURCE_EXHAUSTED")
    empty = record(chunks=[(1.5, 0)])
    assert (outcome(refused), outcome(empty)) == ("refused", "failed")
    assert not meets_slo(refused, SLO()) and not meets_slo(empty, SLO())


def test_meets_slo_needs_both_bounds_and_none_is_unbounded():
    slow_first = record(sent=0.0, chunks=[(0.5, 1), (0.51, 1)])  # TTFT 500 ms, TPOT 10 ms
    assert meets_slo(slow_first, SLO(ttft_ms=600, tpot_ms=20))
    assert not meets_slo(slow_first, SLO(ttft_ms=400, tpot_ms=20))
    assert not meets_slo(slow_first, SLO(ttft_ms=600, tpot_ms=5))
    assert meets_slo(slow_first, SLO(ttft_ms=None, tpot_ms=20))
    assert meets_slo(slow_first, SLO())


def test_attainment_joint_vs_per_slo_counts_misses_over_all_requests():
    records = [
        record(0, sent=0.0, chunks=[(0.1, 1), (0.2, 1)]),    # TTFT 100, TPOT 100: meets both
        record(1, sent=0.0, chunks=[(0.9, 1), (1.0, 1)]),    # TTFT 900: misses TTFT only
        record(2, sent=0.0, chunks=[(0.1, 1), (0.6, 1)]),    # TPOT 500: misses TPOT only
        record(3, status="refused", error="busy"),
        record(4, status="failed", error="broken"),
    ]
    scored = rescore(records, SLO(ttft_ms=200, tpot_ms=200))
    assert scored["attainment"] == pytest.approx({"joint": 1 / 5, "ttft": 2 / 5, "tpot": 2 / 5})
    assert scored["slo"] == {"ttft_ms": 200, "tpot_ms": 200}
    assert rescore([], SLO())["attainment"] == {"joint": None, "ttft": None, "tpot": None}


def test_scaled_slos_keep_unbounded_and_reject_bad_factors():
    assert scaled_slos(SLO(100, None), [0.5, 2]) == [SLO(50, None), SLO(200, None)]
    with pytest.raises(ValueError, match="> 0"):
        scaled_slos(SLO(100, 10), [0])
    with pytest.raises(ValueError, match="> 0 ms"):
        SLO(ttft_ms=-1)


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([(1, 1.0), (2, 0.95), (3, 0.8)], 2 + (0.95 - 0.9) / (0.95 - 0.8)),  # interpolated
        ([(3, 0.5), (1, 0.99), (2, 0.9)], 2 + (0.9 - 0.9) / (0.9 - 0.5)),    # unsorted; exactly 90% passes
        ([(1, 0.99), (2, 0.95)], 2),                                          # all pass: the highest rate
        ([(1, 0.5), (2, 0.4)], None),                                         # none passes
        ([(1, 0.95), (2, 0.85), (3, 0.92), (4, 0.2)], 3 + (0.92 - 0.9) / (0.92 - 0.2)),  # a dip below is noise
        ([], None),
    ],
)
def test_goodput(points, expected):
    result = goodput(points)
    assert result == (None if expected is None else pytest.approx(expected))


def run_summary(rate: float, attainment: float) -> dict[str, Any]:
    """A summary at a target rate whose requests meet the SLO with the given share (of 20)."""
    num_met = round(20 * attainment)
    records = [record(i, sent=i * 0.1, chunks=[(i * 0.1 + (0.1 if i < num_met else 5.0), 1)]) for i in range(20)]
    return summarize(records, SLO(ttft_ms=1000, tpot_ms=None), target_rate=rate)


def test_sweep_summary_goodput_and_lower_bound():
    sweep = sweep_summary([run_summary(4, 0.5), run_summary(1, 1.0), run_summary(2, 0.95)])
    assert sweep["schema"] == SWEEP_SCHEMA
    assert [p["rate_rps"] for p in sweep["points"]] == [1, 2, 4]
    assert sweep["goodput_rps"] == pytest.approx(2 + 2 * (0.95 - 0.9) / (0.95 - 0.5))
    assert not sweep["goodput_is_lower_bound"]
    all_pass = sweep_summary([run_summary(1, 1.0), run_summary(2, 0.95)])
    assert (all_pass["goodput_rps"], all_pass["goodput_is_lower_bound"]) == (2, True)


def test_sweep_summary_rejects_mixed_slos_and_closed_loop_runs():
    other = summarize([record(chunks=[(1.1, 1)])], SLO(ttft_ms=5), target_rate=1)
    with pytest.raises(ValueError, match="one SLO"):
        sweep_summary([run_summary(1, 1.0), other])
    with pytest.raises(ValueError, match="target rate"):
        sweep_summary([summarize([record(chunks=[(1.1, 1)])], SLO(), target_rate=None)])


def golden_records() -> list[RequestRecord]:
    return [
        record(0, sent=0.0, chunks=[(0.12, 1), (0.15, 1), (0.19, 1), (0.22, 1)], server={"prefill_s": 0.1}),
        record(1, sent=0.5, chunks=[(0.8, 3), (0.9, 2)], prompt_tokens=40),   # speculation: several per chunk
        record(2, sent=1.0, chunks=[(1.05, 1)], max_tokens=1),
        record(3, sent=1.5, chunks=[(2.9, 1), (3.0, 1)]),                      # misses TTFT
        record(4, sent=2.0, status="refused", error="RESOURCE_EXHAUSTED: queue full", finished_s=2.01),
        record(5, sent=2.5, chunks=[(2.7, 1)], status="failed", error="stream broke", finished_s=2.8),
        record(6, sent=3.0, chunks=[], finished_s=3.2),                        # ok but empty: failed
    ]


def test_summary_matches_golden():
    summary = summarize(golden_records(), SLO(ttft_ms=500, tpot_ms=60), target_rate=2.0, meta={"workload": "chat"})
    if os.environ.get("SPLITSERVE_REGENERATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert summary["schema"] == SUMMARY_SCHEMA == golden["schema"]
    assert list(summary) == sorted(summary)
    assert_same(json.loads(json.dumps(summary)), golden)


def assert_same(actual: Any, expected: Any, where: str = "summary") -> None:
    """Equal structure and keys; floats equal to 1e-9 relative."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), f"{where}: keys differ"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-9), where
    else:
        assert actual == expected, where


def test_summary_numbers():
    summary = summarize(golden_records(), SLO(ttft_ms=500, tpot_ms=60), target_rate=2.0)
    assert summary["counts"] == {"ok": 4, "refused": 1, "failed": 2, "total": 7}
    assert summary["attainment"]["joint"] == pytest.approx(3 / 7)
    assert summary["duration_s"] == pytest.approx(3.2)                    # first send to the last end
    assert summary["request_rate"]["completed"] == pytest.approx(4 / 3.2)
    assert summary["request_rate"]["sent"] == pytest.approx(6 / 3.0)
    assert summary["output_tokens_per_s"] == pytest.approx((4 + 5 + 1 + 2) / 3.2)
    assert summary["latency_ms"]["ttft"]["p50"] == pytest.approx((120 + 300) / 2)
    assert len(summary["errors"]) == 3


def test_summary_without_ok_requests_has_no_nan():
    summary = summarize([record(status="refused", error="busy")], SLO(), target_rate=None, duration_s=0.0)
    text = json.dumps(summary)
    assert "NaN" not in text and "Infinity" not in text
    assert summary["latency_ms"]["ttft"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert summary["request_rate"]["completed"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in summary["attainment"].values())
