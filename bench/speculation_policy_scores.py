"""Scores of bench.speculation_policy's runs, from splitserve.loadtest records: every latency,
attainment and rate is metrics.py's (``summarize``, ``request_metrics``), laid out in the fields
bench/speculation_policy_report.py reads; the speculation numbers come from the router's report
on each request's last message (``RequestRecord.server``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from splitserve.loadtest.metrics import SLO, outcome, request_metrics, summarize
from splitserve.loadtest.records import RequestRecord


@dataclass
class Run:
    """One policy's run at one rate: its entry in the JSON (``run_entry``), its records and the
    output token ids of its requests."""

    entry: dict
    records: list[RequestRecord]
    outputs: list[list[int]]


def run_entry(records: list[RequestRecord], slo: SLO, rate: float, duration_s: float, k: int, extra: dict) -> dict:
    """A run's scores: the summary's fields the report reads, the speculation numbers (k: the
    policy's initial k), extra, each request's latencies and the summary itself."""
    summary = summarize(records, slo, target_rate=rate, duration_s=duration_s)
    return {**flat(summary), **speculation_summary(records, k), **extra,
            "per_request": [per_request(r) for r in records], "summary": summary}


def per_request(record: RequestRecord) -> dict:
    """metrics.py's latencies of one request, in seconds (None when it failed): kept in the JSON
    for the report's paired bootstrap."""
    m = request_metrics(record)
    if m is None:
        return {"ok": False, "ttft_s": None, "tpot_s": None, "e2e_s": None, "output_tokens": record.output_tokens}
    return {"ok": True, "ttft_s": m.ttft_s, "tpot_s": m.tpot_s, "e2e_s": m.e2e_s, "output_tokens": m.output_tokens}


def flat(summary: dict) -> dict:
    """The fields the report reads, from a metrics.summarize summary (ms -> s)."""
    latency, counts, duration = summary["latency_ms"], summary["counts"], summary["duration_s"]

    def s(ms: float | None) -> float | None:
        return None if ms is None else ms / 1e3

    met = (summary["attainment"]["joint"] or 0.0) * counts["total"]
    return {
        "num_requests": counts["total"], "num_failed": counts["total"] - counts["ok"],
        **{f"{key}_s": {p: s(latency[key][p]) for p in ("p50", "p90", "p99")} for key in ("ttft", "tpot", "e2e")},
        "e2e_mean_s": s(latency["e2e"]["mean"]), "tpot_mean_s": s(latency["tpot"]["mean"]),
        "throughput_rps": summary["request_rate"]["completed"] or 0.0,
        "attainment": summary["attainment"]["joint"] or 0.0,
        "slo_met_rps": met / duration if duration else 0.0,  # requests meeting the SLO per second of the runs
    }


def speculation_summary(records: list[RequestRecord], initial_k: int) -> dict:
    """From the router's reports: the k it set (k_history: the initial k, then each change; an
    empty history means ``initial_k`` throughout; mean over each request's settings, then over
    requests), drafts per verification step and acceptance."""
    done = [(r.server, r.output_tokens) for r in records if outcome(r) == "ok" and r.server]
    drafts = sum(rep["draft_tokens"] for rep, _ in done)
    accepted = sum(rep["accepted_tokens"] for rep, _ in done)
    steps = sum(n - 1 - rep["accepted_tokens"] for rep, n in done)  # the first token comes from the prefill
    return {
        "k_set_mean": mean([statistics.fmean(rep["k_history"] or [initial_k]) for rep, _ in done]),
        "k_final_mean": mean([(rep["k_history"] or [initial_k])[-1] for rep, _ in done]),
        "drafts_per_step": drafts / steps if steps else None,
        "acceptance_rate": accepted / drafts if drafts else None,
        "num_draft_tokens": drafts, "num_accepted_tokens": accepted, "num_verify_steps": steps,
    }


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def pool(runs: list[Run], rate: float, slo: SLO, k: int) -> dict:
    """One policy's rounds at one rate as one sample: metrics.summarize over all their requests,
    the runs' durations summed; k: the policy's initial k."""
    records = [record for r in runs for record in r.records]
    duration = sum(r.entry["summary"]["duration_s"] for r in runs)
    summary = summarize(records, slo, target_rate=rate, duration_s=duration)
    return {**flat(summary), "e2e_mean_s_by_round": [r.entry["e2e_mean_s"] for r in runs],
            **speculation_summary(records, k), "num_k_changes": sum(r.entry["num_k_changes"] for r in runs),
            "summary": summary}
