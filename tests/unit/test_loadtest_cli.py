"""`splitserve loadtest` end to end against the stand-in gRPC server (tests/unit/loadtest_servers.py)
on a loop in another thread: run, sweep, search, slo-scale and report write and read the results
folders; bad input ends with one sentence and status 2, an unreachable target with status 1.

Real timings vary with the machine, so the SLOs here are far above the service times (met
unless the machine stalls for seconds) and the scaled ones far below them (missed for certain:
sleeps never wake early); exact attainments and goodputs are the runner's tests, on virtual time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splitserve.cli import main
from splitserve.loadtest import cli, workloads
from splitserve.loadtest.metrics import GOODPUT_ATTAINMENT, goodput
from splitserve.loadtest.records import read_jsonl
from splitserve.loadtest.report import format_rate
from tests.unit.frontend_helpers import LoopThread
from tests.unit.loadtest_servers import Service, start_grpc


class StandIn:
    """A stand-in gRPC server on a loop thread; ``service`` can be swapped between commands."""

    def __init__(self) -> None:
        self.loop = LoopThread()
        self.holder = Service()
        self.server, port = self.loop.run(start_grpc(self.holder))
        self.target = f"grpc://127.0.0.1:{port}"

    def serve(self, **timings: Any) -> Service:
        """Serve from now on with these timings (a fresh Service)."""
        fresh = Service(**timings)
        for name, value in vars(fresh).items():
            setattr(self.holder, name, value)
        return self.holder

    def close(self) -> None:
        self.loop.run(self.server.stop(0))
        self.loop.close()


@pytest.fixture(scope="module")
def stand_in() -> Iterator[StandIn]:
    server = StandIn()
    yield server
    server.close()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return workloads.load_tokenizer(None)


@pytest.fixture(autouse=True)
def loaded_once(monkeypatch: pytest.MonkeyPatch, tokenizer: Any) -> None:
    """The default tokenizer, loaded once for the module (reading the GGUF takes seconds)."""
    load = workloads.load_tokenizer
    monkeypatch.setattr(cli, "load_tokenizer", lambda path=None: tokenizer if path is None else load(path))


def loadtest(*args: Any) -> int:
    try:
        return main(["loadtest", *map(str, args)])
    except SystemExit as exit:  # argparse
        return int(exit.code or 0)


def common(stand_in: StandIn, out: Path, *extra: Any) -> list[Any]:
    return ["--target", stand_in.target, "--workload", "fixed:8/4", "--arrival", "constant", "--no-progress",
            "--out", out, *extra]


def test_run_writes_records_summary_and_plots(stand_in: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture):
    service = stand_in.serve(ttft_s=0.03, itl_s=0.01)
    out = tmp_path / "run"
    assert loadtest("run", *common(stand_in, out, "--rate", 20, "--num-requests", 6, "--seed", 3,
                                   "--slo-ttft-ms", 2000, "--slo-tpot-ms", 500)) == 0
    records = read_jsonl(out / "requests.jsonl")
    assert [(r.status, r.output_tokens, r.prompt_tokens) for r in records] == [("ok", 4, 8)] * 6
    assert records[0].server["decode_worker"] == "decode-0"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attainment"]["joint"] == 1.0 and summary["counts"]["ok"] == 6
    meta = summary["meta"]
    assert {k: meta[k] for k in ("target", "workload", "arrival", "seed", "scale", "slo", "slo_sent")} == {
        "target": stand_in.target, "workload": "fixed:8/4", "arrival": "constant", "seed": 3, "scale": 1.0,
        "slo": {"ttft_ms": 2000.0, "tpot_ms": 500.0}, "slo_sent": False}
    assert meta["command"].startswith("splitserve loadtest run --target grpc://") and "python" in meta["versions"]
    assert {p.name for p in out.glob("*.png")} == {"ttft_cdf.png", "tpot_cdf.png", "phases.png"}
    assert "6 requests: 6 ok" in capsys.readouterr().out
    assert [(r.max_tokens, r.ignore_eos, r.HasField("slo")) for r in service.bodies] == [(4, True, False)] * 6

    assert loadtest("slo-scale", out, "--factors", "0.01,1") == 0  # TTFT SLO 20 ms < 30 ms: none attain
    scaled = json.loads((out / "slo-scale.json").read_text())["results"]
    assert [(row["slo"]["ttft_ms"], row["attainment"]["joint"]) for row in scaled] == [(20.0, 0.0), (2000.0, 1.0)]
    assert loadtest("slo-scale", out, "--slo-ttft-ms", 25) == 0
    assert json.loads((out / "slo-scale.json").read_text())["results"][0]["slo"] == {"ttft_ms": 25.0,
                                                                                      "tpot_ms": 500.0}
    (out / "ttft_cdf.png").unlink()
    assert loadtest("report", out) == 0
    assert (out / "ttft_cdf.png").is_file() and "6 requests: 6 ok" in capsys.readouterr().out


def test_a_closed_loop_run_sends_the_slo_when_asked(stand_in: StandIn, tmp_path: Path):
    service = stand_in.serve(ttft_s=0.0, itl_s=0.0)
    assert loadtest("run", *common(stand_in, tmp_path, "--arrival", "concurrency:2", "--num-requests", 4,
                                   "--slo-tpot-ms", 50, "--send-slo")) == 0
    assert {(r.slo.HasField("ttft_ms"), r.slo.tpot_ms) for r in service.bodies} == {(False, 50.0)}
    assert json.loads((tmp_path / "summary.json").read_text())["request_rate"]["target"] is None


def test_sweep_then_report_and_slo_scale(stand_in: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture):
    """Capacity 1, service time >= 0.1 s, refusing: all served at 1 req/s (unless the machine
    stalls for 0.9 s), some refused at 30 req/s (a send every 33 ms)."""
    stand_in.serve(ttft_s=0.04, itl_s=0.02, capacity=1)
    assert loadtest("sweep", *common(stand_in, tmp_path, "--rates", "1,30", "--num-requests", 3,
                                     "--slo-ttft-ms", 2000, "--slo-tpot-ms", 500)) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    points = [(p["rate_rps"], p["attainment"]) for p in sweep["points"]]
    assert [rate for rate, _ in points] == [1.0, 30.0] and points[0][1] == 1.0 and points[1][1] < GOODPUT_ATTAINMENT
    assert sweep["goodput_rps"] == pytest.approx(goodput(points)) and 1.0 <= sweep["goodput_rps"] < 30.0
    assert {p.name for p in tmp_path.iterdir()} >= {"rate-1", "rate-30", "sweep.json", "attainment.png"}
    assert "goodput" in capsys.readouterr().out

    (tmp_path / "attainment.png").unlink()
    assert loadtest("report", tmp_path) == 0
    assert (tmp_path / "attainment.png").is_file() and "goodput" in capsys.readouterr().out
    assert loadtest("slo-scale", tmp_path, "--factors", "0.01,1") == 0  # TTFT 20 ms < 40 ms: no rate attains
    scaled = json.loads((tmp_path / "slo-scale.json").read_text())["results"]
    assert [row["goodput_rps"] for row in scaled] == [None, sweep["goodput_rps"]]
    assert (tmp_path / "slo-scale.png").is_file()


def test_search_reports_the_bracket(stand_in: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture):
    """Where the bracket lands depends on the machine (6 req/s leaves 67 ms between a request's
    end and the next); that it is a bracket, and the one reported, does not."""
    stand_in.serve(ttft_s=0.04, itl_s=0.02, capacity=1)
    assert loadtest("search", *common(stand_in, tmp_path, "--start-rate", 6, "--steps", 0, "--num-requests", 4,
                                      "--slo-ttft-ms", 2000, "--slo-tpot-ms", 500)) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    lower, upper = sweep["search"]["lower_rate"], sweep["search"]["upper_rate"]
    assert lower is not None and upper == 2 * lower  # no bisection steps: adjacent rates of the doubling
    attainment = {p["rate_rps"]: p["attainment"] for p in sweep["points"]}
    assert attainment[lower] >= GOODPUT_ATTAINMENT > attainment[upper]
    assert f"attainment >= 90% at {format_rate(lower)}, below at {format_rate(upper)}" in capsys.readouterr().out


def test_an_unreachable_target_is_status_1(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert loadtest("run", "--target", "grpc://127.0.0.1:1", "--rate", 1, "--workload", "fixed:4/2",
                    "--timeout", 0.3, "--out", tmp_path) == 1
    assert capsys.readouterr().err.strip() == (
        "splitserve loadtest run: error: cannot reach grpc://127.0.0.1:1: no connection within 0.3 s")


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--rate", 0], "argument --rate: expected a number > 0, got '0'"),
    (["run", "--rate", 1, "--workload", "fixed:8"], "argument --workload: workload 'fixed:8'"),
    (["run", "--rate", 1, "--arrival", "gamma:x"], "argument --arrival: arrival 'gamma:x': gamma:CV needs CV"),
    (["run", "--rate", 1, "--num-requests", "1.5"], "argument --num-requests: expected a whole number >= 1"),
    (["run"], "--rate is required with poisson arrivals (requests/s)"),
    (["run", "--rate", 1, "--arrival", "concurrency:2"], "--rate does not apply to concurrency:2"),
    (["run", "--rate", 1, "--send-slo"], "--send-slo needs --slo-ttft-ms or --slo-tpot-ms"),
    (["run", "--rate", 1, "--workload", "fixed:8/4", "--max-prompt-tokens", 4], "exceed the cap of 4"),
    (["run", "--rate", 1, "--tokenizer", "/nonexistent"], "is neither a .gguf file nor an HF folder"),
    (["sweep", "--rates", "1,x"], "argument --rates: expected a number > 0, got 'x'"),
    (["sweep", "--rates", "1", "--arrival", "concurrency:2"], "sweep varies the request rate"),
    (["search", "--steps", "-1"], "argument --steps: expected a whole number >= 0"),
])
def test_bad_run_flags_are_one_sentence_and_status_2(args: list[Any], message: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture):
    command, *rest = args
    assert loadtest(command, "--target", "grpc://127.0.0.1:1", "--out", tmp_path, *rest) == 2
    err = capsys.readouterr().err
    assert f"splitserve loadtest {command}: error: " in err and message in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--target", "localhost:50051", "--rate", 1], "target must be grpc://HOST:PORT or http(s)://"),
    (["slo-scale", "{dir}"], "give --factors, or --slo-ttft-ms/--slo-tpot-ms"),
    (["slo-scale", "{dir}", "--factors", "1"], "holds no load test results"),
    (["report", "{dir}/nothing"], "holds no load test results"),
])
def test_bad_targets_and_folders(args: list[Any], message: str, tmp_path: Path, capsys: pytest.CaptureFixture):
    assert loadtest(*[str(a).format(dir=tmp_path) for a in args]) == 2
    assert message in capsys.readouterr().err


def test_results_are_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "summary.json").write_text("{}")
    assert loadtest("run", "--target", "grpc://127.0.0.1:1", "--rate", 1, "--out", tmp_path) == 2
    assert "already holds results (summary.json); choose another --out" in capsys.readouterr().err
