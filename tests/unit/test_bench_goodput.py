"""bench.goodput's pure parts: the plan (workloads, --rates, duration estimate), the scores
(pooled goodput, paired bootstrap intervals, the issue's ratios) and the report, on synthetic
per-request outcomes; no servers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.goodput_plan import (
    COLOCATED_2,
    DISAGGREGATED,
    ELASTIC,
    VLLM,
    WORKLOADS,
    WorkloadPlan,
    estimate_seconds,
    parse_rates,
    plan_workloads,
    rotated,
)
from bench.goodput_report import dumps, publish, report
from bench.goodput_scores import meets, request_rows, score, score_workload, targets
from splitserve.loadtest.metrics import SLO, meets_slo
from splitserve.loadtest.records import Chunk, RequestRecord

SLO_DICT = {"ttft_ms": 1000.0, "tpot_ms": 100.0, "isolated_prefill_s": 0.2, "batch1_decode_step_s": 0.05,
            "median_prompt_tokens": 127, "ttft_source": "5 x isolated prefill", "tpot_source": "2 x decode step"}
FOUR = [ELASTIC, DISAGGREGATED, COLOCATED_2, VLLM]


def rows(met: list[bool]) -> list[list]:
    """Requests that meet (TTFT 0.1 s) or miss (TTFT 5 s) the 1 s TTFT SLO."""
    return [[i, 0.1 if m else 5.0, 0.01] for i, m in enumerate(met)]


def workload(per_round: list[dict[str, dict[float, list[bool]]]]) -> dict:
    return {"slo": SLO_DICT, "rounds": [
        {"round": i + 1, "systems": {s: {"requests": {f"{r:g}": rows(m) for r, m in rates.items()}}
                                     for s, rates in rnd.items()}}
        for i, rnd in enumerate(per_round)]}


def all_or_none(pattern: list[int], n: int = 10) -> dict[float, list[bool]]:
    """Rates 1, 2, 3, ...: every request met where pattern has 1, none where 0."""
    return {float(k + 1): [bool(p)] * n for k, p in enumerate(pattern)}


# ------------------------------------------------------------------------------------ scores


def test_rows_score_as_metrics_does():
    slo = SLO(ttft_ms=500, tpot_ms=50)
    records = [
        RequestRecord(0, 0.0, 0.0, 10, 3, chunks=[Chunk(0.2, 1), Chunk(0.25, 1), Chunk(0.3, 1)]),  # met
        RequestRecord(1, 0.0, 0.0, 10, 3, chunks=[Chunk(0.6, 1), Chunk(0.61, 2)]),  # TTFT missed
        RequestRecord(2, 0.0, 0.0, 10, 3, chunks=[Chunk(0.1, 1), Chunk(0.3, 1)]),  # TPOT 200 ms missed
        RequestRecord(3, 0.0, 0.0, 10, 3, status="failed", error="boom"),
        RequestRecord(4, 0.0, 0.0, 10, 3, chunks=[]),  # ok but empty: failed
        RequestRecord(5, 0.0, 0.1, 10, 1, chunks=[Chunk(0.2, 1)]),  # one token: TPOT 0
    ]
    saved = request_rows(reversed(records))
    assert [r[0] for r in saved] == list(range(6))
    assert saved[3] == [3, None, None] and saved[4] == [4, None, None]
    assert [meets(r, slo) for r in saved] == [meets_slo(r, slo) for r in records] == [True, False, False, False,
                                                                                      False, True]


def test_identical_rounds_give_exact_goodputs_ratios_and_degenerate_intervals():
    rnd = {ELASTIC: all_or_none([1, 1, 1, 0]), DISAGGREGATED: all_or_none([1, 1, 0, 0]),
           COLOCATED_2: all_or_none([1, 0, 0, 0]), VLLM: all_or_none([1, 1, 0, 0])}
    scored = score_workload(workload([rnd] * 3), FOUR, resamples=200)
    systems = scored["systems"]
    assert scored["rounds_used"] == [1, 2, 3]
    for name, expected in ((ELASTIC, 3.1), (DISAGGREGATED, 2.1), (COLOCATED_2, 1.1), (VLLM, 2.1)):
        assert systems[name]["goodput_rps"] == pytest.approx(expected)
        assert systems[name]["by_round"] == pytest.approx([expected] * 3)
        assert systems[name]["interval95"] == pytest.approx([expected, expected])
        assert systems[name]["attainment"]["1"] == 1.0 and systems[name]["num_requests"]["4"] == 30
    parity, vs_vllm = targets("chat-x0.125", scored)
    assert parity["best_baseline"] == DISAGGREGATED and parity["judged_on"] == "lower95"
    assert parity["value"] == pytest.approx(3.1 / 2.1)
    assert parity["by_round"] == pytest.approx([3.1 / 2.1] * 3)
    assert parity["interval95"] == pytest.approx([3.1 / 2.1] * 2) and parity["met"]
    assert vs_vllm["value"] == pytest.approx(3.1 / 2.1) and vs_vllm["target"] == 1.3 and vs_vllm["met"]
    assert targets("chat-x0.5", scored)[1]["target"] == 1.5
    assert not targets("chat-x0.5", scored)[1]["met"]  # 1.48 < 1.5


def test_rounds_pool_at_each_rate_and_the_interval_spans_the_rounds():
    def elastic(num_met: int) -> dict[float, list[bool]]:
        return {1.0: [True] * 10, 2.0: [True] * num_met + [False] * (10 - num_met)}

    vllm = {1.0: [True] * 10, 2.0: [False] * 10}
    w = workload([{ELASTIC: elastic(n), VLLM: vllm} for n in (10, 9, 5)])
    scored = score_workload(w, FOUR, resamples=2000)
    e = scored["systems"][ELASTIC]
    assert e["attainment"] == {"1": 1.0, "2": pytest.approx(0.8)}
    assert e["goodput_rps"] == pytest.approx(1.5)  # 1 + (1 - 0.9) / (1 - 0.8)
    assert e["by_round"] == pytest.approx([2.0, 2.0, 1.2])
    assert scored["systems"][VLLM]["goodput_rps"] == pytest.approx(1.1)
    row = targets("chat-x0.125-bursty", scored)[1]
    assert row["value"] == pytest.approx(1.5 / 1.1)
    assert row["by_round"] == pytest.approx([2 / 1.1, 2 / 1.1, 1.2 / 1.1])
    low, high = row["interval95"]
    assert low < row["value"] < high <= 2 / 1.1 + 1e-9
    assert not row["met"]  # 1.36 < 1.5
    parity = targets("chat-x0.125-bursty", scored)[0]
    assert parity["value"] is None and not parity["met"] and "not measured" in parity["notes"][0]


def test_bootstrap_is_paired_identical_systems_give_a_ratio_of_exactly_one():
    rng = np.random.default_rng(1)
    per_round = []
    for _ in range(3):
        noisy = {r: list(rng.random(12) < p) for r, p in ((0.5, 0.97), (1.0, 0.9), (2.0, 0.6), (3.0, 0.3))}
        per_round.append({ELASTIC: noisy, DISAGGREGATED: noisy, COLOCATED_2: {r: [False] * 12 for r in noisy}})
    scored = score_workload(workload(per_round), FOUR, resamples=500)
    assert scored["systems"][ELASTIC]["interval95"][0] < scored["systems"][ELASTIC]["interval95"][1]
    parity = targets("chat-x0.125", scored)[0]
    assert parity["value"] == pytest.approx(1.0) and parity["interval95"] == pytest.approx([1.0, 1.0])
    assert parity["met"]


def test_a_round_missing_a_system_is_left_out_and_a_system_never_measured_is_dropped():
    ok = {ELASTIC: all_or_none([1, 0]), VLLM: all_or_none([1, 1])}
    w = workload([ok, {VLLM: all_or_none([1, 1])}, ok])
    w["rounds"][1]["systems"][ELASTIC] = {"error": "exited with 2"}
    scored = score_workload(w, FOUR, resamples=50)
    assert scored["rounds_used"] == [1, 3] and set(scored["systems"]) == {ELASTIC, VLLM}
    assert scored["systems"][VLLM]["is_lower_bound"]
    below = score_workload(workload([{ELASTIC: all_or_none([0, 0]), VLLM: all_or_none([1, 0])}]), FOUR, 50)
    assert below["systems"][ELASTIC]["goodput_rps"] is None and below["systems"][ELASTIC]["is_below_range"]
    row = targets("chat-x0.125", below)[1]
    assert row["value"] == 0.0 and not row["met"] and any("below 90%" in n for n in row["notes"])


# -------------------------------------------------------------------------------------- plan


def test_rates_apply_to_all_or_one_workload():
    names = ["chat-x0.125", "chat-x0.5"]
    assert parse_rates(["2,1"], names) == {"chat-x0.125": (1.0, 2.0), "chat-x0.5": (1.0, 2.0)}
    assert parse_rates(["1,2", "chat-x0.5=0.1,0.2"], names) == {"chat-x0.125": (1.0, 2.0), "chat-x0.5": (0.1, 0.2)}
    for bad in (["chat-x9=1"], ["1,x"], ["0,1"], [""]):
        with pytest.raises(ValueError):
            parse_rates(bad, names)
    plans = plan_workloads(names, {"chat-x0.5": (0.1, 0.2)}, quick=True)
    assert plans[0].rates == (1.0, 3.0) and plans[1].rates == (0.1, 0.2)
    with pytest.raises(ValueError, match="max-model-len"):
        plan_workloads(["chat-x0.5"], {}, max_prompt_tokens=2000)
    with pytest.raises(ValueError, match="--workloads"):
        plan_workloads(["chat"], {})
    with pytest.raises(ValueError):
        WorkloadPlan("x", 1.0, "poisson", (2.0, 1.0), 100)


def test_rotation_and_the_default_run_fits_three_hours():
    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"] and rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    plans = plan_workloads(list(WORKLOADS), {})
    assert [p.arrival for p in plans] == ["poisson", "poisson", "gamma:3"]
    assert 2 * 3600 < estimate_seconds(plans, 4, 3, 24, 60.0) < 3 * 3600


# ------------------------------------------------------------------------------------ report


def synthetic_result() -> dict:
    rnd = {ELASTIC: all_or_none([1, 1, 1, 0]), DISAGGREGATED: all_or_none([1, 1, 0, 0]),
           COLOCATED_2: all_or_none([1, 0, 0, 0]), VLLM: all_or_none([1, 1, 0, 0])}
    w = workload([rnd] * 3)
    w["rounds"][2]["systems"][VLLM] = {"error": "not ready after 900 s"}
    w["plan"] = {"workload": "chat", "scale": 0.125, "arrival": "poisson", "max_prompt_tokens": 1024,
                 "max_output_tokens": 256}
    return {"machine": {"date": "2026-12-03", "nproc": 2, "load_average_at_start": [0.5, 0.5, 0.5]},
            "revision": "abc", "config": {"num_requests": 10, "duration": 60.0},
            "rounds": [{"round": i} for i in (1, 2, 3)], "systems": {s: {} for s in FOUR},
            "workloads": {"chat-x0.125": w}}


def test_report_of_a_saved_result(tmp_path):
    path = tmp_path / "goodput.json"
    publish(synthetic_result(), path, quiet=True)
    saved = json.loads(path.read_text())
    assert (tmp_path / "goodput.png").stat().st_size > 0
    assert saved["workloads"]["chat-x0.125"]["scores"]["rounds_used"] == [1, 2]
    assert len(saved["targets"]) == 2 and all(t["met"] for t in saved["targets"])
    text = report(saved)
    assert "| system | 1 req/s | 2 req/s | 3 req/s | 4 req/s | goodput (req/s) | by round | 95% interval |" in text
    assert f"| {ELASTIC} | 100% | 100% | 100% | 0% | 3.10 | 3.10 / 3.10 | 3.10-3.10 |" in text
    assert "round 3: vLLM CPU failed: not ready after 900 s" in text
    assert "target interval lower bound >= 0.95: MET" in text


def test_dumps_keeps_number_lists_on_one_line_and_round_trips():
    data = {"a": [[0, 0.5, None], [1, 1e-3, 2]], "b": ["x  y", "[1, 2]"], "c": {"d": [True, False]}}
    text = dumps(data)
    assert json.loads(text) == data and "[0, 0.5, null]" in text and '"x  y"' in text
    score(synthetic_result(), resamples=10)  # scoring in place needs no more than the result
