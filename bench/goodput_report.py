"""The report of bench.goodput, from a result dict alone, so ``--report JSON`` recomputes it for a
saved run: the scores and targets (bench/goodput_scores.py), the tables and the plot.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.common import markdown_table
from bench.goodput_scores import BOOTSTRAP_RESAMPLES, score
from splitserve.loadtest.metrics import GOODPUT_ATTAINMENT

_SCALARS = r"(?:-?[0-9][0-9.eE+-]*|null|true|false|NaN|-?Infinity)"
_SCALAR_LIST = re.compile(rf"\[\s*({_SCALARS}(?:,\s*{_SCALARS})*)\s*\]")


def dumps(result: dict) -> str:
    """The result as indented JSON with every list of numbers on one line (the per-request rows)."""
    return _SCALAR_LIST.sub(lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", json.dumps(result, indent=1))


def _rate(r: str | float) -> str:
    return f"{float(r):g}"


def _goodput(s: dict) -> str:
    if s["goodput_rps"] is None:
        return "< lowest rate" if s["is_below_range"] else "—"
    return (">= " if s["is_lower_bound"] else "") + f"{s['goodput_rps']:.2f}"


def _span(interval: list | None, unit: str = "") -> str:
    if not interval:
        return "—"
    low, high = ("—" if v is None else f"{v:.2f}" for v in interval)
    return f"{low}-{high if interval[1] is not None else 'unbounded'}{unit}"


def workload_table(workload: dict) -> str:
    """Pooled attainment per rate, goodput, goodput by round and its 95% interval, per system."""
    scores = workload["scores"]["systems"]
    rates = sorted({float(r) for s in scores.values() for r in s["attainment"]})
    header = ["system", *[f"{r:g} req/s" for r in rates], "goodput (req/s)", "by round", "95% interval"]
    rows = []
    for name, s in scores.items():
        cells = [f"{100 * s['attainment'][_rate(r)]:.0f}%" if _rate(r) in s["attainment"] else "-" for r in rates]
        by_round = " / ".join("below" if g is None else f"{g:.2f}" for g in s["by_round"])
        rows.append([name, *cells, _goodput(s), by_round, _span(s["interval95"])])
    return markdown_table(header, rows)


def _errors(workload: dict) -> list[str]:
    return [f"round {r['round']}: {name} failed: {s['error']}" for r in workload["rounds"]
            for name, s in r["systems"].items() if "error" in s]


def target_line(t: dict) -> str:
    if t["value"] is None and not t["by_round"]:
        verdict = "n/a"
        text = "—"
    else:
        text = "—" if t["value"] is None else f"{t['value']:.2f}x"
        details = [f"best baseline {t['best_baseline']}"] if t["ratio"].startswith("elastic / max") else []
        if len(t["by_round"]) > 1:
            details.append("by round " + ", ".join("—" if v is None else f"{v:.2f}" for v in t["by_round"]))
        details.append(f"95% interval {_span(t['interval95'])}")
        text += f" ({'; '.join(details)})"
        verdict = "MET" if t["met"] else "NOT met"
    judged = "interval lower bound" if t["judged_on"] == "lower95" else "value"
    notes = "".join(f"; {n}" for n in t["notes"])
    return f"- {t['workload']}: {t['ratio']} = {text}; target {judged} >= {t['target']:g}: {verdict}{notes}"


def report(result: dict) -> str:
    m, config = result["machine"], result["config"]
    lines = [(f"date {m['date']}, nproc {m['nproc']}, load average at start {m['load_average_at_start'][0]:.2f}, "
              f"revision {result['revision']}, {len(result['rounds'])} round(s), system order rotated each round, "
              f"up to {config['num_requests']} requests per rate within {config['duration']:g} s")]
    for name, w in result["workloads"].items():
        plan, slo = w["plan"], w["slo"]
        used = w["scores"]["rounds_used"]
        lines += ["", (f"{name}: {plan['workload']} x{plan['scale']:g}, {plan['arrival']} arrivals, prompts capped "
                       f"at {plan['max_prompt_tokens']} tokens, outputs at {plan['max_output_tokens']}; attainment "
                       f"pooled over rounds {', '.join(map(str, used)) or '(none)'}"),
                  (f"SLO: TTFT <= {slo['ttft_ms']:.0f} ms ({slo['ttft_source']}: "
                   f"{1000 * slo['isolated_prefill_s']:.0f} ms for {slo['median_prompt_tokens']} tokens), TPOT <= "
                   f"{slo['tpot_ms']:.0f} ms ({slo['tpot_source']}: {1000 * slo['batch1_decode_step_s']:.1f} ms)"),
                  "", workload_table(w)]
        lines += _errors(w)
    lines += ["", (f"Targets (goodput = the rate at {GOODPUT_ATTAINMENT:.0%} attainment, pooled over rounds; "
                   f"paired bootstrap 95% intervals, {BOOTSTRAP_RESAMPLES} resamples):")]
    lines += [target_line(t) for t in result["targets"]]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Top: goodput per system per workload (bars: pooled; whiskers: 95% interval; dots: rounds).
    Bottom: pooled attainment vs rate, one panel per workload."""
    workloads = result["workloads"]
    systems = list(result["systems"])
    fig = Figure(figsize=(max(5.0 * len(workloads), 8.0), 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, len(workloads))
    bars = fig.add_subplot(grid[0, :])
    width = 0.8 / max(len(systems), 1)
    for i, system in enumerate(systems):
        xs, ys, errors = [], [], [[], []]
        for j, w in enumerate(workloads.values()):
            s = w["scores"]["systems"].get(system)
            if s is None:
                continue
            x, y = j + (i - (len(systems) - 1) / 2) * width, s["goodput_rps"] or 0.0
            low, high = s["interval95"] or [y, y]
            xs.append(x)
            ys.append(y)
            errors[0].append(max(y - low, 0.0))
            errors[1].append(max(high - y, 0.0))
            rounds = [g or 0.0 for g in s["by_round"]]
            bars.scatter([x] * len(rounds), rounds, color="black", s=10, zorder=3)
        bars.bar(xs, ys, width, yerr=errors, capsize=3, color=f"C{i}", label=system)
    bars.set_xticks(range(len(workloads)), list(workloads))
    bars.set(ylabel="goodput (req/s at 90% attainment)", title="Goodput: pooled over rounds, 95% interval, rounds "
             "as dots (0: below the lowest rate)")
    bars.legend(fontsize="small")
    for j, (name, w) in enumerate(workloads.items()):
        ax = fig.add_subplot(grid[1, j])
        for i, system in enumerate(systems):
            s = w["scores"]["systems"].get(system)
            if s is not None and s["attainment"]:
                rates = sorted(s["attainment"], key=float)
                ax.plot([float(r) for r in rates], [100 * s["attainment"][r] for r in rates], marker="o",
                        color=f"C{i}", label=system)
        ax.axhline(100 * GOODPUT_ATTAINMENT, color="gray", linestyle="--")
        ax.set(title=name, xlabel="request rate (req/s)", ylabel="SLO attainment, pooled (%)", ylim=(0, 102))
    fig.savefig(path, dpi=110)
    return path


def publish(result: dict, path: Path, *, quiet: bool = False) -> None:
    """Score the result, write it to path (JSON) and its plot beside it (.png); print the report
    unless quiet."""
    score(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(result) + "\n")
    plot(result, path.with_suffix(".png"))
    if not quiet:
        print(report(result))
