"""Load-test tables: they render every field of a summary and of a sweep, None included."""

from __future__ import annotations

from rich.console import Console

from splitserve.loadtest.metrics import SLO, summarize, sweep_summary
from splitserve.loadtest.records import Chunk, RequestRecord
from splitserve.loadtest.report import format_summary, summary_table, sweep_table


def records(ttft: float, num_failed: int = 0) -> list[RequestRecord]:
    ok = [RequestRecord(i, i * 0.5, i * 0.5, 10, 3, chunks=[Chunk(i * 0.5 + ttft + 0.01 * j, 1) for j in range(3)])
          for i in range(8)]
    failed = [RequestRecord(8 + i, 4.0, 4.0, 10, 3, status="failed", error="broken") for i in range(num_failed)]
    return ok + failed


def render(table) -> str:
    console = Console(width=100, color_system=None)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def test_summary_table_and_plain_text():
    summary = summarize(records(0.1, num_failed=1), SLO(ttft_ms=200, tpot_ms=None), target_rate=2.0)
    text = render(summary_table(summary))
    assert "9 requests: 8 ok, 0 refused, 1 failed" in text
    assert "TTFT <= 200 ms, TPOT <= any" in text and "attainment 88.9%" in text
    plain = format_summary(summary)
    assert plain.isascii() and "TTFT" in plain and "E2E" in plain


def test_summary_table_without_ok_requests():
    failed = [RequestRecord(0, 0.0, 0.0, 10, 3, status="refused", error="busy")]
    assert "-" in format_summary(summarize(failed, SLO(), target_rate=None))


def test_sweep_table_states_goodput_and_lower_bound():
    slo = SLO(ttft_ms=300, tpot_ms=None)
    runs = [summarize(records(ttft), slo, target_rate=rate) for rate, ttft in ((1.0, 0.1), (2.0, 0.1), (3.0, 0.5))]
    text = render(sweep_table(sweep_summary(runs)))
    assert "goodput" in text and "100.0%" in text
    lower_bound = render(sweep_table(sweep_summary(runs[:2])))
    assert "goodput >= 2 req/s" in lower_bound
