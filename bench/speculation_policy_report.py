"""The report of bench.speculation_policy: the issue's targets, the tables and the plot, from a
result dict alone, so ``--report JSON`` recomputes them for a saved run (runs saved before
bench.speculation_policy used splitserve.loadtest have the same fields).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.common import markdown_table

RATE_NAMES = ("low", "medium", "high")
ADAPTIVE = "adaptive"
LOW_LOAD_SPEEDUP = 1.5  # target: adaptive mean E2E >= 1.5x lower than k=0 at low load on lookup
SATURATION_SLACK = 0.05  # target: adaptive mean E2E at most 5% above k=0's at the high rate
BOOTSTRAP_RESAMPLES = 4000  # for the 95% interval of adaptive / best fixed


def targets(workloads: dict) -> list[dict]:
    """The issue's three targets, on mean E2E latency over completed requests (a failed adaptive
    request fails the target)."""
    out = []
    for rate_name in RATE_NAMES:
        for workload, w in workloads.items():
            runs = w["rates"][rate_name]["policies"]
            e2e = {p: r["e2e_mean_s"] for p, r in runs.items()}
            ok = runs[ADAPTIVE]["num_failed"] == 0 and e2e[ADAPTIVE] is not None
            fixed = {p: v for p, v in e2e.items() if p != ADAPTIVE and v is not None}
            best = min(fixed, key=fixed.__getitem__)
            ratio = e2e[ADAPTIVE] / fixed[best] if ok else None
            # the same ratio round by round (paired: both ran the same arrivals minutes apart)
            by_round = [r["policies"][ADAPTIVE]["e2e_mean_s"] / r["policies"][best]["e2e_mean_s"]
                        for r in w["rates"][rate_name]["rounds"]
                        if r["policies"][ADAPTIVE]["e2e_mean_s"] and r["policies"][best]["e2e_mean_s"]]
            interval = paired_interval(w["rates"][rate_name]["rounds"], list(fixed)) if ok else None
            text = _ratio(ratio, "x best fixed")
            if ok:
                notes = [f"by round: {', '.join(f'{v:.2f}' for v in by_round)}"] if len(by_round) > 1 else []
                notes += [f"95% interval {interval[0]:.2f}-{interval[1]:.2f}"] if interval else []
                text += f" ({'; '.join(notes)})" if notes else ""
            met = ok and ratio <= 1.0
            out.append({"rate": rate_name, "workload": workload, "target": f"adaptive <= best fixed ({best})",
                        "value": ratio, "by_round": by_round, "interval95": interval, "text": text, "met": met,
                        "within_noise": not met and interval is not None and interval[0] <= 1.0})
            if rate_name == "low" and workload == "lookup":
                speedup = e2e["k=0"] / e2e[ADAPTIVE] if ok else None
                out.append({"rate": rate_name, "workload": workload,
                            "target": f"adaptive >= {LOW_LOAD_SPEEDUP:g}x lower mean latency than k=0",
                            "value": speedup, "text": _ratio(speedup, "x lower"),
                            "met": ok and speedup >= LOW_LOAD_SPEEDUP})
            if rate_name == "high":
                over = e2e[ADAPTIVE] / e2e["k=0"] - 1 if ok else None
                out.append({"rate": rate_name, "workload": workload,
                            "target": f"adaptive at most {SATURATION_SLACK:.0%} worse than k=0 at saturation",
                            "value": over, "text": "—" if over is None else f"{over:+.1%}",
                            "met": ok and over <= SATURATION_SLACK})
    return out


def paired_interval(rounds: list[dict], fixed: list[str], resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = 0) -> tuple[float, float] | None:
    """95% interval of adaptive / best fixed k (mean E2E) by a paired two-stage bootstrap.

    Each resample draws rounds with replacement, then each drawn round's requests with
    replacement, the same draws for every policy (a round's policies ran the same arrivals and
    prompts). Drawing rounds carries the host's drift from one round to the next; drawing requests
    the spread within a run. The best fixed k is picked again in every resample, so the interval
    also carries the luck of choosing the best of several noisy means after the fact. Requests
    that failed under any policy are left out."""
    names = [ADAPTIVE, *fixed]
    blocks = []  # per round: policies x requests
    for rnd in rounds:
        per = [rnd["policies"][name]["per_request"] for name in names]
        keep = [i for i in range(len(per[0])) if all(p[i]["ok"] for p in per)]
        if keep:
            blocks.append(np.array([[p[i]["e2e_s"] for i in keep] for p in per]))
    if not blocks:
        return None
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    for j in range(resamples):
        sums = np.zeros(len(names))
        for b in rng.integers(0, len(blocks), size=len(blocks)):
            block = blocks[b]
            sums += block[:, rng.integers(0, block.shape[1], size=block.shape[1])].sum(axis=1)
        ratios[j] = sums[0] / sums[1:].min()  # sums, not means: the request count cancels
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def _ratio(value: float | None, unit: str) -> str:
    return "— (adaptive had failed requests)" if value is None else f"{value:.2f}{unit}"


def workload_table(w: dict) -> str:
    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v * 1e3:.0f}"

    def num(v: float | None, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    header = ["rate", "req/s", "policy", "mean E2E ms", "by round", "vs k=0", "p99 E2E ms", "mean TPOT ms",
              "TTFT p50 ms",
              "done req/s", "SLO attain.", "SLO-met req/s", "k set", "drafts/step", "accept", "k changes", "failed"]
    body = []
    for rate_name, r in w["rates"].items():
        k0 = r["policies"]["k=0"]["e2e_mean_s"]
        for policy, s in r["policies"].items():
            vs = s["e2e_mean_s"] / k0 if s["e2e_mean_s"] is not None and k0 else None
            body.append([rate_name, f"{r['rate_rps']:.3g}", policy, ms(s["e2e_mean_s"]),
                         " / ".join(map(ms, s["e2e_mean_s_by_round"])), num(vs, ".2f"),
                         ms(s["e2e_s"]["p99"]), ms(s["tpot_mean_s"]), ms(s["ttft_s"]["p50"]),
                         f"{s['throughput_rps']:.2f}", f"{s['attainment']:.0%}", f"{s['slo_met_rps']:.2f}",
                         num(s["k_set_mean"], ".1f"), num(s["drafts_per_step"], ".2f"),
                         num(s["acceptance_rate"], ".2f"), str(s["num_k_changes"]), str(s["num_failed"])])
    return markdown_table(header, body)


def report(result: dict) -> str:
    m = result["machine"]
    lines = [f"date {m['date']}, nproc {m['nproc']}, ray {m['ray']}, load average at start "
             f"{m['load_average_at_start'][0]:.2f}, revision {result['revision']}"]
    for name, w in result["workloads"].items():
        p = w["profile"]
        lens = sorted(x["tokens"] for x in w["prompts"])
        lines += ["", f"{name}: {len(lens)} prompts of {lens[0]}-{lens[-1]} tokens, {result['config']['max_tokens']} "
                  f"output tokens; isolated k=0: E2E {p['isolated_e2e_s'] * 1e3:.0f} ms, TTFT "
                  f"{p['isolated_ttft_s'] * 1e3:.0f} ms, TPOT {p['isolated_tpot_s'] * 1e3:.1f} ms (median of "
                  f"{p['num_requests']}); SLO TTFT <= {p['ttft_s'] * 1e3:.0f} ms ({p['ttft_source']}), TPOT <= "
                  f"{p['tpot_s'] * 1e3:.0f} ms ({p['tpot_source']})",
                  "rates: " + ", ".join(f"{n} {r['rate_rps']:.3g} req/s ({r['given']}, {r['num_rounds']} x "
                                        f"{r['num_requests']} requests)" for n, r in w["rates"].items()),
                  "", workload_table(w), ""]
        for rate_name, r in w["rates"].items():
            same = ", ".join(f"{p} {a['identical_requests']}/{a['requests']}"
                             for p, a in r["agreement_with_k0"].items())
            lines.append(f"greedy outputs identical to k=0's at {rate_name}: {same}")
        for policy, g in w["goodput"].items():
            value = "—" if g["goodput_rps"] is None else f"{g['goodput_rps']:.2f} req/s"
            lines.append(f"goodput {policy}: {value} ({g['note']})")
    lines += ["", "Targets (mean E2E latency over completed requests)"]
    for rate_name in RATE_NAMES:
        for t in (t for t in result["targets"] if t["rate"] == rate_name):
            verdict = "MET" if t["met"] else "NOT met" + (" (within noise)" if t.get("within_noise") else "")
            lines.append(f"{rate_name} {t['workload']}: {t['target']}: {t['text']} {verdict}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str:
    """Mean E2E latency against rate, one line per policy, one panel per workload; the bars span
    the policy's round means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = result["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
    for ax, (name, w) in zip(axes[0], workloads.items()):
        rates = [r["rate_rps"] for r in w["rates"].values()]
        for policy in next(iter(w["rates"].values()))["policies"]:
            runs = [(r["rate_rps"], r["policies"][policy]) for r in w["rates"].values()]
            points = [(x, s["e2e_mean_s"], [v for v in s["e2e_mean_s_by_round"] if v is not None])
                      for x, s in runs if s["e2e_mean_s"] is not None]
            xs, ys, by_round = zip(*points)
            spread = [[y - min(v) for y, v in zip(ys, by_round)], [max(v) - y for y, v in zip(ys, by_round)]]
            ax.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, label=policy)
        ax.set(xscale="log", title=name, xlabel="request rate (req/s, log scale)", ylabel="mean E2E latency (s)")
        ax.set_xticks(rates, [f"{n}\n{r:.2g}" for n, r in zip(w["rates"], rates)])
        ax.set_xticks([], minor=True)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def publish(result: dict, path: Path) -> None:
    """Score the targets, write the JSON to ``path`` and the plot beside it, print the tables."""
    result["targets"] = targets(result["workloads"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(report(result))
    print(plot(result, path.with_suffix(".png")))
