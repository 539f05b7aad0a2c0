"""Tables of load-test results for the terminal (rich) and for logs (plain text).

They read the summary and sweep dicts of metrics.py, so saved JSON results print the same way
as fresh ones.
"""

from __future__ import annotations

import io
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E"))
STATS = ("mean", "p50", "p90", "p99")


def summary_table(summary: dict[str, Any]) -> Table:
    """Latency statistics (ms) of one run, with counts, attainment and rates in the caption."""
    counts = summary["counts"]
    table = Table(
        title=f"{counts['total']} requests: {counts['ok']} ok, {counts['refused']} refused, {counts['failed']} failed",
        caption="\n".join(_run_caption(summary)),
        caption_justify="left",
        min_width=60,
    )
    table.add_column("latency (ms)")
    for stat in STATS:
        table.add_column(stat, justify="right")
    for key, name in LATENCIES:
        stats = summary["latency_ms"][key]
        table.add_row(name, *(_number(stats[stat]) for stat in STATS))
    return table


def _run_caption(summary: dict[str, Any]) -> list[str]:
    attainment, rate = summary["attainment"], summary["request_rate"]
    return [
        f"SLO {_slo(summary['slo'])}",
        f"attainment {_percent(attainment['joint'])} (TTFT {_percent(attainment['ttft'])}, "
        f"TPOT {_percent(attainment['tpot'])})",
        f"req/s: target {_number(rate['target'])}, sent {_number(rate['sent'])}, "
        f"completed {_number(rate['completed'])}",
        f"output tokens/s: {_number(summary['output_tokens_per_s'])}",
    ]


def sweep_table(sweep: dict[str, Any]) -> Table:
    """One row per target rate: attainment and p90 latencies, with the goodput in the caption."""
    table = Table(title=f"SLO {_slo(sweep['slo'])}", caption=_goodput_caption(sweep))
    # rates in req/s, latencies in ms; short headers keep the table within 80 columns
    columns = ("rate/s", "attain.", "TTFT att", "TPOT att", "done/s", "p90 TTFT", "p90 TPOT")
    for column in columns:
        table.add_column(column, justify="right")
    for point in sweep["points"]:
        table.add_row(
            _number(point["rate_rps"]),
            _percent(point["attainment"]),
            _percent(point["ttft_attainment"]),
            _percent(point["tpot_attainment"]),
            _number(point["completed_rps"]),
            _number(point["ttft_p90_ms"]),
            _number(point["tpot_p90_ms"]),
        )
    return table


def _goodput_caption(sweep: dict[str, Any]) -> str:
    threshold = _percent(sweep["threshold"])
    goodput = sweep["goodput_rps"]
    if goodput is None:
        return f"goodput: no rate reached {threshold} attainment (below the lowest rate measured)"
    if sweep["goodput_is_lower_bound"]:
        return f"goodput >= {_number(goodput)} req/s (every rate reached {threshold}: sweep higher)"
    return f"goodput {_number(goodput)} req/s (highest rate with >= {threshold} attainment, interpolated)"


def rescale_table(rows: list[dict[str, Any]]) -> Table:
    """The rows of ``saved.rescale``: attainment per SLO for a run, goodput per SLO for a sweep."""
    is_sweep = "goodput_rps" in rows[0]
    table = Table(title="SLO scale")
    measures = ("goodput",) if is_sweep else ("attainment", "TTFT att.", "TPOT att.")
    for column in ("scale", "TTFT SLO", "TPOT SLO", *measures):
        table.add_column(column, justify="right")
    for row in rows:
        cells = [f"x{row['factor']:g}", _bound(row["slo"]["ttft_ms"]), _bound(row["slo"]["tpot_ms"])]
        if is_sweep:
            cells.append((">= " if row["goodput_is_lower_bound"] else "") + format_rate(row["goodput_rps"]))
        else:
            cells += [_percent(row["attainment"][key]) for key in ("joint", "ttft", "tpot")]
        table.add_row(*cells)
    return table


def format_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g} req/s"


def format_summary(summary: dict[str, Any], width: int = 100) -> str:
    """summary_table as plain ASCII text, for logs."""
    table = summary_table(summary)
    table.box = box.ASCII
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(table)
    return out.getvalue()


def _slo(slo: dict[str, float | None]) -> str:
    return f"TTFT <= {_bound(slo['ttft_ms'])}, TPOT <= {_bound(slo['tpot_ms'])}"


def _bound(ms: float | None) -> str:
    return "any" if ms is None else f"{ms:g} ms"


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"  # 4 digits, never 1.2e+04


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"
