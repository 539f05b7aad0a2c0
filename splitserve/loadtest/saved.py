"""Saved load test results: a run's or a sweep's folder read back, re-scored under other SLOs
without sending a request (DistServe's "SLO scale"), and its plots drawn again. Used by
``splitserve loadtest slo-scale`` and ``report``; the folders are those ``runner`` writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.loadtest.metrics import SLO, rescore, summarize, sweep_summary
from splitserve.loadtest.records import RequestRecord, read_jsonl
from splitserve.loadtest.runner import write_json


@dataclass(frozen=True)
class SavedRun:
    """One run's folder: its records and summary."""

    folder: Path
    records: list[RequestRecord]
    summary: dict[str, Any]


@dataclass(frozen=True)
class Results:
    """A results folder: one run, or a sweep (sweep.json) and its rate-<r> runs."""

    folder: Path
    runs: list[SavedRun]
    sweep: dict[str, Any] | None = None

    @property
    def slo(self) -> SLO:
        """The SLO the results were scored under."""
        saved = self.runs[0].summary["slo"]
        return SLO(saved["ttft_ms"], saved["tpot_ms"])


def load_results(folder: Path) -> Results:
    """The results in folder; ValueError with a sentence when it holds none."""
    if (folder / "sweep.json").is_file():
        runs = [_saved_run(path.parent) for path in sorted(folder.glob("rate-*/summary.json"))]
        if not runs:
            raise ValueError(f"{folder} has a sweep.json but no rate-*/ run folders")
        return Results(folder, runs, _read_json(folder / "sweep.json"))
    if (folder / "summary.json").is_file():
        return Results(folder, [_saved_run(folder)])
    raise ValueError(f"{folder} holds no load test results (summary.json or sweep.json)")


def _saved_run(folder: Path) -> SavedRun:
    return SavedRun(folder, read_jsonl(folder / "requests.jsonl"), _read_json(folder / "summary.json"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no results object")
    return data


def rescale(results: Results, slos: dict[float, SLO]) -> list[dict[str, Any]]:
    """A row per factor -> SLO: a run's attainment (metrics.rescore), or a sweep's summary with
    its goodput under that SLO. Written to FOLDER/slo-scale.json, and for a sweep the
    attainment curves on one plot, FOLDER/slo-scale.png."""
    from splitserve.loadtest.plots import plot_compare  # matplotlib: imported only when plotting

    if results.sweep is None:
        rows = [{"factor": factor} | rescore(results.runs[0].records, slo) for factor, slo in slos.items()]
    else:
        sweeps = {factor: _rescored_sweep(results, slo) for factor, slo in slos.items()}
        plot_compare({f"SLO x{factor:g}": sweep for factor, sweep in sweeps.items()},
                     results.folder / "slo-scale.png")
        rows = [{"factor": factor} | sweep for factor, sweep in sweeps.items()]
    write_json(results.folder / "slo-scale.json", {"results": rows})
    return rows


def _rescored_sweep(results: Results, slo: SLO) -> dict[str, Any]:
    assert results.sweep is not None, "a sweep's results"
    runs = [summarize(run.records, slo, target_rate=run.summary["request_rate"]["target"],
                      duration_s=run.summary["duration_s"], meta=run.summary["meta"]) for run in results.runs]
    return sweep_summary(runs, meta=results.sweep["meta"])


def replot(results: Results) -> list[Path]:
    """Draw every run's plots and the sweep's again; the files written."""
    from splitserve.loadtest.plots import plot_run, plot_sweep

    written = [path for run in results.runs for path in plot_run(run.records, run.summary, run.folder)]
    if results.sweep is not None:
        label = str(results.sweep["meta"].get("target", results.folder.name))
        written.append(plot_sweep(results.sweep, results.folder, label=label))
    return written
