"""bench.sim_validation's pure parts on small made-up runs (no servers): the comparison (RMSE in
points, goodput, the systems' order), how a recorded server command becomes a simulated cluster,
and a whole replay of a synthetic bench.goodput folder with a made-up profile."""

from __future__ import annotations

import json
import sys

import pytest

from bench import sim_validation
from bench.goodput_scores import sent_rows
from bench.sim_validation import check_sent, profiles_by_threads, replay_of, request_slo, sent_requests, validate
from bench.sim_validation_scores import compare, pairs_agreeing, ranking, rmse_points
from splitserve.loadtest.records import RequestRecord
from splitserve.protocol import SLO

SLO_ = SLO(1.0, 0.1)
META = {"workload": "chat", "scale": 0.125, "arrival": "poisson", "seed": 3, "num_requests": 8, "duration_s": 60.0,
        "max_prompt_tokens": 1024, "max_output_tokens": 256}
# ms-free seconds, as `splitserve profile` writes: a 100-token prefill ~0.1 s, a decode step ~0.03 s.
PROFILE = {"schema": "splitserve.profile/1", "model": "test-model", "device": "test-cpu", "measured": {"threads": 1},
           "tp": {"1": {"kv_capacity_tokens": 20000,
                        "prefill": {"const": 0.02, "tokens": 8e-4, "tokens_sq": 1e-7},
                        "decode_step": {"const": 0.03, "requests": 1e-3, "batched_tokens": 0.0,
                                        "context_tokens": 1e-6, "draft_tokens": 0.0}}}}


def serve(*flags: str, threads: int = 1) -> list[str]:
    return ["/venv/bin/splitserve", "serve", "--grpc-port", "0", *flags, "--threads-per-worker", str(threads)]


def score(attainment: dict[str, float], goodput: float | None) -> dict:
    return {"attainment": attainment, "goodput_rps": goodput, "is_lower_bound": False, "is_below_range": False}


# ------------------------------------------------------------------------------ comparison


def test_rmse_is_in_points_over_the_rates_both_have():
    assert rmse_points({"1": 1.0, "2": 0.8}, {"1": 0.9, "2": 0.6, "3": 0.1}) == pytest.approx(100 * (0.025 ** 0.5))
    assert rmse_points({"1": 1.0}, {"2": 1.0}) is None


def test_order_by_goodput_then_mean_attainment_and_pairs_that_agree():
    measured = {"a": score({"1": 1.0, "2": 0.9}, 2.0), "b": score({"1": 1.0, "2": 0.5}, 1.2),
                "c": score({"1": 0.95, "2": 0.5}, 1.2)}
    assert ranking(measured) == ["a", "b", "c"]  # b and c: same goodput, b's mean attainment higher
    same = compare(measured, measured)
    assert same["order"]["matches"] and same["rmse_points"] == 0.0
    swapped = {"a": measured["b"], "b": measured["a"], "c": measured["c"]}
    result = compare(measured, swapped)
    assert result["order"]["simulated"] == ["b", "a", "c"]
    assert pairs_agreeing(measured, swapped) == (2, 3) and not result["order"]["matches"]
    # Systems the simulation cannot tell apart do not agree with a measured difference.
    flat = {name: score({"1": 0.0, "2": 0.0}, None) for name in measured}
    assert compare(measured, flat)["order"]["pairs_agreeing"] == 0


def test_compare_reports_each_systems_rates_rmse_and_goodput():
    result = compare({"a": score({"1": 1.0, "2": 0.8}, 1.5)}, {"a": score({"1": 0.9, "2": 0.8}, 1.8)})
    a = result["systems"]["a"]
    assert a["rates"]["1"] == {"measured": 1.0, "simulated": 0.9}
    assert a["rmse_points"] == pytest.approx(100 * (0.005 ** 0.5))
    assert a["goodput_rps"]["measured"]["value"] == 1.5 and a["goodput_rps"]["simulated"]["value"] == 1.8


# ------------------------------------------------------------------------------ systems


@pytest.fixture
def profiles(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(PROFILE))
    return profiles_by_threads([path])


def test_a_recorded_serve_command_becomes_its_simulated_cluster(profiles):
    elastic = replay_of({"command": serve("--mode", "elastic", "--workers", "2", "--slo-tpot-ms", "111",
                                          "--no-admission"), "send_slo": True}, profiles)
    assert elastic.config.describe() == "elastic 1P(TP1)+1D(TP1)" and not elastic.config.placement.admission
    assert elastic.default_slo == SLO(None, 0.111)  # requests carry the sweep's SLO when it sent it:
    assert request_slo(META | {"slo_sent": True, "slo": {"ttft_ms": 1000.0, "tpot_ms": 100.0}},
                       elastic.default_slo) == SLO_
    assert request_slo(META | {"slo_sent": False}, elastic.default_slo) == SLO(None, 0.111)
    disaggregated = replay_of({"command": serve("--mode", "disaggregated", "--prefill-workers", "1",
                                                "--decode-workers", "1", "--max-num-batched-tokens", "512")},
                              profiles)
    assert disaggregated.config.describe() == ("disaggregated 1P(TP1)+1D(TP1), prefill chunks of 512, decode chosen "
                                               "at arrival")
    assert disaggregated.default_slo == SLO()
    colocated = replay_of({"command": serve("--mode", "colocated", "--workers", "2", "--num-kv-blocks", "100")},
                          profiles)
    assert colocated.config.describe() == "colocated 2x(TP1) chunked"
    assert colocated.profile.at_tp(1).kv_capacity_tokens == 100 * 16  # --num-kv-blocks x the block size
    assert colocated.notes == ("prefix caching is on in the server, not in the simulation",)


def test_systems_it_cannot_simulate_are_named_with_a_reason(profiles):
    assert "not a splitserve server" in replay_of({"command": ["/v/bin/vllm", "serve", "model"]}, profiles)
    admission = {"command": serve("--mode", "disaggregated"), "send_slo": True}
    assert "SLO admission" in replay_of(admission, profiles)
    speculating = {"command": serve("--mode", "disaggregated", "--speculative", "ngram")}
    assert replay_of(speculating, profiles) == "speculative decoding is not simulated"
    two_threads = {"command": serve("--mode", "colocated", "--workers", "1", threads=2)}
    assert replay_of(two_threads, profiles) == "no profile measured with 2 threads per worker"
    # No --threads-per-worker: the machine's CPUs split among the workers, as the server splits them.
    unset = {"command": ["/v/bin/splitserve", "serve", "--mode", "colocated", "--workers", "2"]}
    assert not isinstance(replay_of(unset, profiles, num_cpus=2), str)
    assert replay_of(unset, profiles, num_cpus=4) == "no profile measured with 2 threads per worker"


# ------------------------------------------------------------------------------ replay


def test_the_replay_sends_what_the_load_tester_sent_before_its_duration():
    requests = sent_requests(META, 0.5)
    assert len(requests) == 8 and requests == sent_requests(META, 0.5)
    cut = sent_requests(META | {"duration_s": requests[3].arrival_s}, 0.5)
    assert [r.index for r in cut] == [0, 1, 2]
    records = [RequestRecord(r.index, r.arrival_s, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in requests]
    check_sent(requests, sent_rows(records), "here")
    records[2].prompt_tokens += 1
    with pytest.raises(ValueError, match="here: the replayed requests differ"):
        check_sent(requests, sent_rows(records), "here")


def goodput_run(tmp_path) -> dict:
    """A bench.goodput result of two rounds, two rates, an elastic and a colocated system and vLLM:
    at 0.5 req/s every request met the SLO, at 4 req/s half of them."""
    systems = {"elastic": {"command": serve("--mode", "elastic", "--workers", "2"), "send_slo": True},
               "colocated": {"command": serve("--mode", "colocated", "--workers", "2")},
               "vLLM CPU": {"command": ["/v/bin/vllm", "serve", "m"]}}
    rounds = []
    for i in range(2):
        meta = META | {"seed": i}
        entry = {"sweep": {"meta": meta}, "requests": {
            "0.5": [[k, 0.2, 0.05] for k in range(8)], "4": [[k, 0.2 if k % 2 else 3.0, 0.05] for k in range(8)]}}
        rounds.append({"round": i + 1, "seed": i, "systems": {name: entry for name in systems}})
    return {"systems": systems, "revision": "abc",
            "workloads": {"chat-x0.125": {"slo": {"ttft_ms": 1000.0, "tpot_ms": 100.0}, "rounds": rounds}}}


def test_a_goodput_folder_is_replayed_scored_and_written(tmp_path, profiles, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "goodput.json").write_text(json.dumps(goodput_run(tmp_path)))
    validation = validate(json.loads((run / "goodput.json").read_text()), profiles)["chat-x0.125"]
    assert set(validation["systems"]) == {"elastic", "colocated"} and "vLLM CPU" in validation["skipped"]
    colocated = validation["systems"]["colocated"]
    assert colocated["rates"]["0.5"]["measured"] == 1.0 and colocated["rates"]["4"]["measured"] == 0.5
    assert 0.0 <= colocated["rates"]["4"]["simulated"] <= 1.0 and colocated["rmse_points"] is not None
    profile_path = tmp_path / "profile.json"
    monkeypatch.setattr(sys, "argv", ["sim_validation", "--goodput-dir", str(run), "--profile", str(profile_path)])
    sim_validation.main()
    saved = json.loads((run / "sim-validation" / "sim_validation.json").read_text())
    assert saved["workloads"]["chat-x0.125"]["order"]["pairs"] == 1
    assert (run / "sim-validation" / "sim_validation.png").stat().st_size > 0
    assert "RMSE (points)" in capsys.readouterr().out
