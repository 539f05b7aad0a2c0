"""PNG plots of load-test results: latency CDFs and phase breakdown of a run, attainment vs rate
of a sweep, and several systems' sweeps on one plot (the headline comparison).

Figures are built with matplotlib's object API on the Agg canvas, never through pyplot, so
plotting sets no global backend and keeps no figure alive after its file is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from splitserve.loadtest.metrics import outcome, request_metrics
from splitserve.loadtest.records import RequestRecord

# Phase times the server reports per request (RequestRecord.server), in the order they happen.
PHASES = ("queue_s", "prefill_s", "transfer_s", "decode_s")
MAX_PHASE_GROUPS = 4


def plot_run(records: Sequence[RequestRecord], summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """ttft_cdf.png and tpot_cdf.png, plus phases.png when the server reported phase times."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in map(request_metrics, records) if m is not None]
    slo = summary["slo"]
    paths = [
        _plot_cdf([m.ttft_s * 1e3 for m in metrics], len(records), "TTFT", slo["ttft_ms"], out_dir / "ttft_cdf.png"),
        _plot_cdf([m.tpot_s * 1e3 for m in metrics], len(records), "TPOT", slo["tpot_ms"], out_dir / "tpot_cdf.png"),
    ]
    with_phases = [r for r in records if outcome(r) == "ok" and any(phase in r.server for phase in PHASES)]
    if with_phases:
        paths.append(_plot_phases(with_phases, out_dir / "phases.png"))
    return paths


def _plot_cdf(values_ms: list[float], num_requests: int, name: str, bound_ms: float | None, path: Path) -> Path:
    """Share of all requests at or below each latency; refused and failed ones never get there,
    so the curve tops out at the ok share."""
    fig, ax = _figure()
    if values_ms:
        ordered = np.sort(values_ms)
        ax.step(ordered, np.arange(1, len(ordered) + 1) / num_requests, where="post", label=name)
    else:
        ax.text(0.5, 0.5, "no completed requests", ha="center", transform=ax.transAxes)
    if bound_ms is not None:
        ax.axvline(bound_ms, color="tab:red", linestyle="--", label=f"SLO {bound_ms:g} ms")
    title = f"{name} CDF: {len(values_ms)} of {num_requests} requests ok"
    ax.set(xlabel=f"{name} (ms)", ylabel="share of requests", ylim=(0, 1.02), title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    return _save(fig, path)


def _plot_phases(records: list[RequestRecord], path: Path) -> Path:
    """Stacked bars of mean phase times, one bar per prompt-length group (shortest prompts first)."""
    groups = _length_groups(records)
    labels = [f"{group[0].prompt_tokens}-{group[-1].prompt_tokens} tok" for group in groups]
    fig, ax = _figure()
    bottoms = np.zeros(len(groups))
    for phase in PHASES:
        means_ms = np.array([_mean_ms([record.server.get(phase) for record in group]) for group in groups])
        ax.bar(labels, means_ms, bottom=bottoms, label=phase.removesuffix("_s"))
        bottoms += means_ms
    ax.set(xlabel="prompt length", ylabel="mean time (ms)", title="Where the time goes, by phase (server-reported)")
    ax.legend()
    return _save(fig, path)


def _length_groups(records: list[RequestRecord]) -> list[list[RequestRecord]]:
    """Up to MAX_PHASE_GROUPS groups of about equal size by prompt length, shortest first."""
    ordered = sorted(records, key=lambda record: record.prompt_tokens)
    num_groups = min(MAX_PHASE_GROUPS, len(ordered))
    bounds = [index * len(ordered) // num_groups for index in range(num_groups + 1)]
    return [ordered[start:end] for start, end in zip(bounds, bounds[1:])]


def _mean_ms(values: list[Any]) -> float:
    numbers = [float(v) for v in values if isinstance(v, int | float)]
    return 1e3 * float(np.mean(numbers)) if numbers else 0.0


def plot_sweep(sweep: dict[str, Any], out_dir: Path, label: str = "splitserve") -> Path:
    """attainment.png: SLO attainment vs request rate, the 90% line and the goodput."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = _figure()
    _draw_sweep(ax, sweep, label, color="tab:blue")
    _finish_attainment_axes(ax, sweep, f"SLO attainment vs rate: {label}")
    return _save(fig, out_dir / "attainment.png")


def plot_compare(sweeps: dict[str, dict[str, Any]], path: Path) -> Path:
    """Several systems' sweeps (label -> sweep summary) as attainment-vs-rate curves on one plot."""
    if not sweeps:
        raise ValueError("plot_compare needs at least one sweep")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = _figure()
    for index, (label, sweep) in enumerate(sweeps.items()):
        _draw_sweep(ax, sweep, label, color=f"C{index}")
    _finish_attainment_axes(ax, next(iter(sweeps.values())), "SLO attainment vs rate")
    return _save(fig, path)


def _draw_sweep(ax: Axes, sweep: dict[str, Any], label: str, color: str) -> None:
    rates = [point["rate_rps"] for point in sweep["points"]]
    attainment = [100 * point["attainment"] for point in sweep["points"]]
    goodput = sweep["goodput_rps"]
    if goodput is not None:
        bound = ">= " if sweep["goodput_is_lower_bound"] else ""
        label = f"{label} (goodput {bound}{goodput:.3g} req/s)"
        ax.axvline(goodput, color=color, linestyle=":", alpha=0.8)
    ax.plot(rates, attainment, marker="o", color=color, label=label)


def _finish_attainment_axes(ax: Axes, sweep: dict[str, Any], title: str) -> None:
    threshold = 100 * sweep["threshold"]
    ax.axhline(threshold, color="gray", linestyle="--", label=f"{threshold:g}% attainment")
    ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment (%)", ylim=(0, 102), title=title)
    ax.legend(loc="lower left")
    slo = sweep["slo"]
    ax.annotate(
        f"SLO: TTFT <= {_ms(slo['ttft_ms'])}, TPOT <= {_ms(slo['tpot_ms'])}",
        xy=(0.99, 0.99), xycoords="axes fraction", ha="right", va="top", fontsize="small",
    )


def _ms(bound: float | None) -> str:
    return "unbounded" if bound is None else f"{bound:g} ms"


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path
