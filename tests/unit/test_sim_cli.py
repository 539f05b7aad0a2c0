"""`splitserve simulate` end to end: it writes a sweep in `splitserve loadtest sweep`'s layout and
schema, which `loadtest report` reads back; bad flags and profiles end with a sentence and
status 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from splitserve.cli import main
from splitserve.latency import DecodeStepModel, PrefillModel
from splitserve.loadtest.metrics import SWEEP_SCHEMA
from splitserve.loadtest.saved import load_results
from splitserve.sim.profile_files import SPLITSERVE_SCHEMA


@pytest.fixture
def profile_path(tmp_path: Path) -> Path:
    """A splitserve profile at TP 1 and 2, made from the fitted models' default coefficients."""
    entry = {"kv_capacity_tokens": 20_000, "prefill": PrefillModel().to_coefficients(),
             "decode_step": DecodeStepModel().to_coefficients()}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"schema": SPLITSERVE_SCHEMA, "model": "tiny", "device": "cpu",
                                "tp": {"1": entry, "2": entry}}))
    return path


def test_simulate_writes_a_sweep_that_loadtest_report_reads(tmp_path, profile_path, capsys):
    out = tmp_path / "out"
    argv = ["simulate", "--profile", str(profile_path), "--prefill-instances", "2", "--decode-tp", "2",
            "--workload", "fixed:64/8", "--num-requests", "40", "--rates", "1,50", "--slo-ttft-ms", "200",
            "--slo-tpot-ms", "50", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "KV transfer: free" in printed and f"results in {out}/" in printed
    results = load_results(out)
    assert results.sweep is not None and results.sweep["schema"] == SWEEP_SCHEMA
    assert [run.summary["request_rate"]["target"] for run in results.runs] == [1.0, 50.0]
    assert all(run.summary["counts"] == {"failed": 0, "ok": 40, "refused": 0, "total": 40} for run in results.runs)
    assert all(len(record.chunks) == 8 for run in results.runs for record in run.records)
    simulator = results.sweep["meta"]["simulator"]
    assert simulator["cluster"] == "disaggregated 2P(TP1)+1D(TP2)" and simulator["num_gpus"] == 4
    assert main(["loadtest", "report", str(out)]) == 0
    assert "SLO TTFT <= 200 ms" in capsys.readouterr().out


def test_simulate_colocated_chunked(tmp_path, profile_path):
    out = tmp_path / "out"
    argv = ["simulate", "--profile", str(profile_path), "--mode", "colocated", "--instances", "2",
            "--colocated-scheduler", "chunked", "--max-batched-tokens", "32", "--workload", "fixed:100/4",
            "--num-requests", "10", "--rates", "2", "--arrival", "constant", "--out", str(out)]
    assert main(argv) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["meta"]["simulator"]["cluster"] == "colocated 2x(TP1) chunked"
    assert sweep["points"][0]["attainment"] == 1.0  # no SLO: every finished request meets it


@pytest.mark.parametrize(("flags", "message"), [
    (["--mode", "colocated", "--prefill-instances", "2"], "--prefill-instances does not apply to --mode colocated"),
    (["--tp", "2", "--colocated-scheduler", "chunked"], "--tp, --colocated-scheduler do not apply to --mode "
                                                        "disaggregated"),
    (["--no-admission"], "--admission/--no-admission does not apply to --mode disaggregated"),
    (["--decode-tp", "4"], r"no profile for TP 4 \(it has TP 1, 2\)"),
    (["--profile-model", "other"], "profiles 'tiny', not 'other'"),
    (["--workload", "fixed:30000/10"], "request 0: its 30000-token prompt exceeds a prefill instance's KV capacity"),
    (["--arrival", "concurrency:3"], "needs an open-loop arrival"),
])
def test_bad_flags_are_one_sentence_and_status_2(tmp_path, profile_path, capsys, flags, message):
    argv = ["simulate", "--profile", str(profile_path), "--rates", "1", "--num-requests", "5",
            "--out", str(tmp_path / "out"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitserve simulate: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [["--rates", "0"], ["--instances", "0"], ["--mode", "hybrid"]])
def test_malformed_flags_are_refused_by_the_parser(profile_path, flags):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--profile", str(profile_path), "--rates", "1", *flags])
    assert exit_info.value.code == 2


def test_a_missing_profile_is_named(tmp_path, capsys):
    assert main(["simulate", "--profile", str(tmp_path / "none.json"), "--rates", "1"]) == 2
    assert "none.json does not exist" in capsys.readouterr().err


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--profile ", "--profile-model", "--mode", "--prefill-instances", "--prefill-tp",
                 "--decode-instances", "--decode-tp", "--instances", "--tp ", "--colocated-scheduler",
                 "--max-batched-tokens", "--workload", "--num-requests", "--rates", "--arrival", "--seed",
                 "--slo-ttft-ms", "--slo-tpot-ms", "--max-context-tokens", "--out"):
        assert flag in text
