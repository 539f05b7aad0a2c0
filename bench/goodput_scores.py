"""bench.goodput's scores from saved per-request outcomes alone (no servers): each system's goodput
pooled over the rounds, its 95% interval, and the issue's ratios with paired 95% intervals.

A run's requests are kept in the JSON as rows ``[index, ttft_s, tpot_s]`` (None, None for a
failed or refused request; ``request_rows``), per workload, round, system and rate, so the scores
can be recomputed (``--report``); beside them (``sent``, from this revision on) what was sent,
``[index, scheduled_s, prompt_tokens, max_tokens]`` (``sent_rows``), for bench.sim_validation.
A request meets the SLO as in splitserve/loadtest/metrics.py (TTFT and TPOT both within their
bounds; failed and refused requests miss), and goodput is
``metrics.goodput`` of (rate, attainment) points, with the attainment at each rate pooled over the
rounds (all their requests at that rate counted together).

Intervals: a paired two-stage bootstrap, as bench/speculation_policy_report.py's. Each resample
draws rounds with replacement, then each drawn round's requests at each rate with replacement, the
same draws for every system (in a round every system ran the same seeded prompts on the same
arrival times), and recomputes every system's pooled goodput; a ratio's interval is the 2.5 and
97.5 percentiles of the resampled ratios. Drawing rounds carries the host's drift between rounds,
drawing requests the spread within a sweep. A goodput below the lowest rate counts as 0 in the
resamples (the ratio is then 0, or +inf when only the baseline's is 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from bench.goodput_plan import COLOCATED_2, DISAGGREGATED, ELASTIC, VLLM
from splitserve.loadtest.metrics import (
    GOODPUT_ATTAINMENT,
    SLO,
    goodput,
    request_metrics,
)
from splitserve.loadtest.records import RequestRecord

BOOTSTRAP_RESAMPLES = 4000
PARITY_FLOOR = 0.95  # elastic / max(1P+1D, colocated 2x1): the interval's lower bound at least this
PARITY_BASELINES = (DISAGGREGATED, COLOCATED_2)
VLLM_TARGETS = {"chat-x0.125": 1.3, "chat-x0.5": 1.5, "chat-x0.125-bursty": 1.5}  # elastic / vLLM CPU

Row = list  # [index, ttft_s | None, tpot_s | None]


def request_rows(records: Iterable[RequestRecord]) -> list[Row]:
    """A run's requests as [index, ttft_s, tpot_s] rows by index (None, None: failed or refused)."""
    rows: list[Row] = []
    for record in sorted(records, key=lambda r: r.index):
        m = request_metrics(record)
        rows.append([record.index, None, None] if m is None else [record.index, m.ttft_s, m.tpot_s])
    return rows


def sent_rows(records: Iterable[RequestRecord]) -> list[list]:
    """What a run sent, by index: [index, scheduled_s, prompt_tokens, max_tokens] (the arrival
    offset and lengths the seed gave; bench.sim_validation checks its replay against them)."""
    return [[r.index, r.scheduled_s, r.prompt_tokens, r.max_tokens] for r in sorted(records, key=lambda r: r.index)]


def meets(row: Row, slo: SLO) -> bool:
    """Whether a request met the SLO: metrics.meets_slo on a saved row."""
    _, ttft_s, tpot_s = row
    if ttft_s is None:
        return False
    return ((slo.ttft_ms is None or ttft_s * 1e3 <= slo.ttft_ms)
            and (slo.tpot_ms is None or tpot_s * 1e3 <= slo.tpot_ms))


@dataclass(frozen=True)
class Outcomes:
    """One workload's met/missed requests: per used round, per rate, a bool matrix systems x the
    request indices every system ran at that rate in that round."""

    systems: list[str]
    rates: list[float]
    rounds: list[list[np.ndarray]]
    round_numbers: list[int]  # which rounds (1-based) were used: those in which every system has results


def outcomes(workload: dict, systems: list[str], slo: SLO) -> Outcomes:
    """The matrices of the given systems (those without results in any round are left out)."""
    rounds = workload["rounds"]
    names = [s for s in systems if any("requests" in r["systems"].get(s, {}) for r in rounds)]
    used = [(i + 1, r) for i, r in enumerate(rounds) if all("requests" in r["systems"].get(s, {}) for s in names)]
    rates = sorted({float(rate) for _, r in used for s in names for rate in r["systems"][s]["requests"]})
    blocks = []
    for _, r in used:
        per_rate = []
        for rate in rates:
            rows = [{row[0]: row for row in r["systems"][s]["requests"].get(f"{rate:g}", [])} for s in names]
            common = sorted(set.intersection(*(set(by_index) for by_index in rows))) if rows else []
            per_rate.append(np.array([[meets(by_index[i], slo) for i in common] for by_index in rows], dtype=bool)
                            .reshape(len(names), len(common)))
        blocks.append(per_rate)
    return Outcomes(names, rates, blocks, [n for n, _ in used])


def pooled_goodput(rates: list[float], met: np.ndarray, total: np.ndarray) -> float | None:
    """metrics.goodput of the pooled attainment (met / total requests) at each rate that has requests."""
    points = [(rate, m / t) for rate, m, t in zip(rates, met, total) if t]
    return goodput(points) if points else None


def _sums(blocks: list[np.ndarray], num_systems: int) -> tuple[np.ndarray, np.ndarray]:
    """One round's per-rate matrices as (met: systems x rates, requests: rates)."""
    met = np.array([b.sum(axis=1) for b in blocks], dtype=float).reshape(len(blocks), num_systems).T
    return met, np.array([b.shape[1] for b in blocks], dtype=float)


def bootstrap(o: Outcomes, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """Resampled pooled goodputs, resamples x systems (0 where below the lowest rate)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((resamples, len(o.systems)))
    if not o.rounds:
        return out
    for j in range(resamples):
        met, total = np.zeros((len(o.systems), len(o.rates))), np.zeros(len(o.rates))
        for k in rng.integers(0, len(o.rounds), size=len(o.rounds)):
            for i, block in enumerate(o.rounds[k]):
                n = block.shape[1]
                if n:
                    met[:, i] += block[:, rng.integers(0, n, size=n)].sum(axis=1)
                    total[i] += n
        out[j] = [pooled_goodput(o.rates, met[s], total) or 0.0 for s in range(len(o.systems))]
    return out


def interval95(samples: np.ndarray) -> list[float | None] | None:
    """The 2.5 and 97.5 percentiles (the nearest resamples, so +inf ratios stay inf, then None:
    unbounded); NaN (0 / 0) resamples dropped; None when nothing is left."""
    kept = samples[~np.isnan(samples)]
    if not kept.size:
        return None
    return [_number(v) for v in np.percentile(kept, [2.5, 97.5], method="nearest")]


def ratio(ours: np.ndarray | float, theirs: np.ndarray | float) -> np.ndarray:
    """ours / theirs, elementwise: +inf where only theirs is 0, NaN where both are."""
    ours, theirs = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(theirs > 0, ours / np.where(theirs > 0, theirs, 1.0), np.where(ours > 0, np.inf, np.nan))


def score_workload(workload: dict, systems: list[str], resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> dict:
    """Per system: pooled attainment per rate, goodput, by round, 95% interval; and the
    resampled goodputs' matrix for the ratios (key "_samples", not saved)."""
    slo = SLO(workload["slo"]["ttft_ms"], workload["slo"]["tpot_ms"])
    o = outcomes(workload, systems, slo)
    samples = bootstrap(o, resamples, seed)
    per_round = [_sums(blocks, len(o.systems)) for blocks in o.rounds]
    met = sum((m for m, _ in per_round), np.zeros((len(o.systems), len(o.rates))))
    total = sum((t for _, t in per_round), np.zeros(len(o.rates)))
    scores = {}
    for s, name in enumerate(o.systems):
        value = pooled_goodput(o.rates, met[s], total)
        attained = [(r, float(m / t)) for r, m, t in zip(o.rates, met[s], total) if t]
        scores[name] = {
            "goodput_rps": value, "is_below_range": value is None and bool(attained),
            "is_lower_bound": bool(attained) and attained[-1][1] >= GOODPUT_ATTAINMENT,
            "by_round": [pooled_goodput(o.rates, m[s], t) for m, t in per_round],
            "interval95": interval95(samples[:, s]),
            "attainment": {f"{r:g}": a for r, a in attained},
            "num_requests": {f"{r:g}": int(t) for r, t in zip(o.rates, total)},
        }
    return {"rounds_used": o.round_numbers, "systems": scores, "_samples": dict(zip(o.systems, samples.T))}


def targets(workload_name: str, scored: dict) -> list[dict]:
    """The issue's two ratios on one workload: elastic / max(1P+1D, colocated 2x1), judged on its
    interval's lower bound, and elastic / vLLM CPU, judged on the pooled value (its interval
    reported beside it)."""
    systems, samples = scored["systems"], scored["_samples"]
    baselines = [b for b in PARITY_BASELINES if b in systems]
    parity = f"elastic / max({', '.join(PARITY_BASELINES)})"
    rows = [_target(workload_name, parity, systems, samples, baselines, PARITY_FLOOR, "lower95")]
    if workload_name in VLLM_TARGETS:
        rows.append(_target(workload_name, f"elastic / {VLLM}", systems, samples, [VLLM] if VLLM in systems else [],
                            VLLM_TARGETS[workload_name], "value"))
    return rows


def _target(workload: str, label: str, systems: dict, samples: dict, baselines: list[str], target: float,
            judged_on: str) -> dict:
    """One ratio row: elastic / the best of baselines (picked again in every resample)."""
    row = {"workload": workload, "ratio": label, "target": target, "judged_on": judged_on, "value": None,
           "best_baseline": None, "by_round": [], "interval95": None, "met": False, "notes": []}
    if ELASTIC not in systems or not baselines:
        missing = [s for s in (ELASTIC, *baselines) if s not in systems] or ["a baseline"]
        row["notes"].append(f"not measured: {', '.join(missing)}")
        return row
    ours = systems[ELASTIC]

    def value(name: str) -> float:
        return systems[name]["goodput_rps"] or 0.0

    best = max(baselines, key=value)
    row["best_baseline"] = best
    row["value"] = _number(ratio(value(ELASTIC), value(best)))
    by_round = zip(ours["by_round"], *(systems[b]["by_round"] for b in baselines))
    row["by_round"] = [_number(ratio(e or 0.0, max(x or 0.0 for x in rest))) for e, *rest in by_round]
    theirs = np.max(np.array([samples[b] for b in baselines]), axis=0)  # the best baseline picked per resample
    row["interval95"] = interval95(ratio(samples[ELASTIC], theirs))
    judged = row["value"] if judged_on == "value" else (row["interval95"] or [None])[0]
    row["met"] = judged is not None and judged >= target
    row["notes"] += _bound_notes(systems, [ELASTIC, *baselines])
    return row


def _number(x: np.ndarray | float) -> float | None:
    """A finite ratio as a float; None for NaN (0 / 0) and +inf (only the baseline at 0), which
    JSON cannot hold."""
    v = float(x)
    return v if np.isfinite(v) else None


def _bound_notes(systems: dict, names: list[str]) -> list[str]:
    notes = []
    for name in names:
        s = systems[name]
        if s["is_lower_bound"]:
            notes.append(f"{name}: every rate met 90%, so its goodput is only a lower bound (add a higher rate)")
        if s["is_below_range"]:
            notes.append(f"{name}: below 90% at every rate, goodput counted as 0 (add a lower rate)")
    return notes


def score(result: dict, resamples: int = BOOTSTRAP_RESAMPLES) -> None:
    """Score every workload of a result in place: ``scores`` per workload and ``targets``."""
    systems = list(result["systems"])
    result["targets"] = []
    for name, workload in result["workloads"].items():
        scored = score_workload(workload, systems, resamples)
        result["targets"] += targets(name, scored)
        del scored["_samples"]
        workload["scores"] = scored
