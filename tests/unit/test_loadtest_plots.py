"""Load-test plots: every file is written and is a PNG (the pictures themselves are looked at by people)."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.loadtest.metrics import SLO, summarize, sweep_summary
from splitserve.loadtest.plots import plot_compare, plot_run, plot_sweep
from splitserve.loadtest.records import Chunk, RequestRecord

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_records(rate: float, with_phases: bool = True) -> list[RequestRecord]:
    records = []
    for i in range(12):
        sent = i / rate
        server = {"queue_s": 0.01 * i, "prefill_s": 0.05, "transfer_s": 0.002, "decode_s": 0.3} if with_phases else {}
        chunks = [Chunk(sent + 0.1 * rate + 0.03 * j, 1) for j in range(5)]
        records.append(RequestRecord(i, sent, sent, 20 + 7 * i, 5, chunks=chunks, server=server))
    records.append(RequestRecord(12, 0.5, 0.5, 30, 5, status="refused", error="busy"))
    return records


def sweep(rates: list[float]) -> dict:
    runs = [summarize(make_records(rate), SLO(ttft_ms=250, tpot_ms=50), target_rate=rate) for rate in rates]
    return sweep_summary(runs)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path


def test_plot_run_writes_cdfs_and_phases(tmp_path):
    records = make_records(2.0)
    paths = plot_run(records, summarize(records, SLO(ttft_ms=300, tpot_ms=None), target_rate=2.0), tmp_path / "run")
    assert [p.name for p in paths] == ["ttft_cdf.png", "tpot_cdf.png", "phases.png"]
    for path in paths:
        assert_png(path)


def test_plot_run_skips_phases_without_server_times_and_survives_no_ok_request(tmp_path):
    records = make_records(2.0, with_phases=False)
    assert [p.name for p in plot_run(records, summarize(records, SLO(), target_rate=2.0), tmp_path)] == [
        "ttft_cdf.png", "tpot_cdf.png"]
    refused = [RequestRecord(0, 0.0, 0.0, 10, 5, status="refused", error="busy")]
    for path in plot_run(refused, summarize(refused, SLO(), target_rate=1.0), tmp_path / "none"):
        assert_png(path)


def test_plot_sweep_and_compare(tmp_path):
    path = plot_sweep(sweep([1.0, 2.0, 4.0]), tmp_path, label="splitserve")
    assert path.name == "attainment.png"
    assert_png(path)
    compare = plot_compare({"splitserve": sweep([1.0, 2.0]), "vllm": sweep([1.0, 3.0])}, tmp_path / "cmp" / "all.png")
    assert_png(compare)
    with pytest.raises(ValueError):
        plot_compare({}, tmp_path / "empty.png")
