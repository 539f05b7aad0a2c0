"""bench.stream_gaps on records laid out as bench.goodput keeps them: gaps pooled over rounds,
stalls counted, short streams left out, placements tallied."""

from __future__ import annotations

import json

import pytest

from bench.stream_gaps import summarize


def _write(root, round_, rate, records):
    path = root / "chat" / f"round-{round_}" / "elastic" / f"rate-{rate}" / "requests.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _record(times, placement="local"):
    return {"chunks": [[t, 1] for t in times], "server": {"placement": placement}}


def test_gaps_pool_over_rounds_and_stalls_are_counted(tmp_path):
    _write(tmp_path, 1, 1, [_record([0.0, 0.1, 0.2, 0.3]), _record([0.0, 0.5], "remote")])  # the 2nd: too short
    _write(tmp_path, 2, 1, [_record([0.0, 0.1, 0.6, 0.7])])
    (row,) = summarize(tmp_path, stall_s=0.3)
    assert (row["workload"], row["system"], row["rate"], row["requests"], row["streams"]) == ("chat", "elastic", 1.0,
                                                                                             3, 2)
    assert row["median_gap_ms"] == pytest.approx(100)
    assert row["median_mean_gap_ms"] == pytest.approx((100 + 700 / 3) / 2)
    assert row["stalls"] == 1 and row["placements"] == {"local": 2, "remote": 1}
