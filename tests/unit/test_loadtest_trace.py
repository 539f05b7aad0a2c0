"""Arrival traces: a file:PATH workload's lines carry ``arrival_s``, ``--arrival trace`` replays
them (as recorded, or scaled in time to a rate) in `splitserve loadtest` and `splitserve
simulate` alike, and bad traces are refused with the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splitserve.cli import main
from splitserve.loadtest import cli, workloads
from splitserve.loadtest.arrivals import parse_arrival
from splitserve.loadtest.records import read_jsonl
from splitserve.loadtest.workloads import parse_workload, read_workload_file, resolve_trace, trace_offsets
from splitserve.sim.trace import make_requests
from tests.unit.test_loadtest_cli import StandIn

TRACE = [0.0, 0.1, 0.3, 0.6]


def write_trace(path: Path, arrivals: list[Any], extra: dict[str, Any] | None = None) -> Path:
    lines = [json.dumps({"prompt_tokens": 8, "max_tokens": 2, **({} if a is None else {"arrival_s": a}),
                         **(extra or {})}) for a in arrivals]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_trace_offsets_as_recorded_and_scaled(tmp_path):
    spec = parse_workload(f"file:{write_trace(tmp_path / 't.jsonl', TRACE)}")
    arrival, n = resolve_trace(parse_arrival("trace"), spec, 100)
    assert n == 4  # a trace is replayed once, not cycled
    assert arrival.offsets(None, n) == TRACE
    assert arrival.trace_rate(n) == pytest.approx(5.0)  # 3 gaps in 0.6 s
    assert arrival.offsets(10.0, n) == pytest.approx([t / 2 for t in TRACE])
    assert resolve_trace(arrival, spec, 2)[1] == 2 and arrival.offsets(None, 2) == TRACE[:2]
    other = parse_arrival("poisson")
    assert resolve_trace(other, spec, 7) == (other, 7)


@pytest.mark.parametrize("value", [-1, "1.0", True, float("nan"), float("inf")])
def test_arrival_s_must_be_a_finite_number_of_seconds(tmp_path, value):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt_tokens": 8, "max_tokens": 2}) + "\n"
                    + json.dumps({"prompt_tokens": 8, "max_tokens": 2, "arrival_s": value}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: \"arrival_s\" must be a finite number"):
        read_workload_file(path)


def test_trace_errors_name_the_file_and_line(tmp_path):
    missing = write_trace(tmp_path / "missing.jsonl", [0.0, None, 1.0])
    with pytest.raises(ValueError, match=rf"{missing}:2: --arrival trace needs \"arrival_s\""):
        trace_offsets(read_workload_file(missing))
    unsorted = write_trace(tmp_path / "unsorted.jsonl", [0.0, 2.0, 1.0])
    with pytest.raises(ValueError, match=rf"{unsorted}:3: arrival_s 1 is before the line above's 2; .* arrival order"):
        trace_offsets(read_workload_file(unsorted))
    with pytest.raises(ValueError, match="replays the arrival_s of a file:PATH workload's lines; workload chat"):
        resolve_trace(parse_arrival("trace"), parse_workload("chat"), 10)
    with pytest.raises(ValueError, match="trace arrivals take their send times from a file:PATH workload"):
        parse_arrival("trace").offsets(None, 3)
    instant = parse_workload(f"file:{write_trace(tmp_path / 'instant.jsonl', [1.0, 1.0])}")
    arrival, n = resolve_trace(parse_arrival("trace"), instant, 10)
    assert arrival.offsets(None, n) == [1.0, 1.0]
    with pytest.raises(ValueError, match="all arrive at one instant: it has no rate to scale"):
        arrival.offsets(2.0, n)
    with pytest.raises(ValueError, match="takes no arguments"):
        parse_arrival("trace:2")


def test_simulate_uses_the_trace_offsets_the_load_tester_sends_at(tmp_path):
    spec = parse_workload(f"file:{write_trace(tmp_path / 't.jsonl', TRACE)}")
    arrival, n = resolve_trace(parse_arrival("trace"), spec, 1000)
    for rate in (2.5, 10.0):  # the runner sends at arrival.offsets(rate, len(specs), seed)
        requests = make_requests(spec, parse_arrival("trace"), rate, 1000)
        assert [r.arrival_s for r in requests] == arrival.offsets(rate, n)
        assert [(r.prompt_tokens, r.output_tokens) for r in requests] == [(8, 2)] * 4


@pytest.fixture(scope="module")
def stand_in() -> Iterator[StandIn]:
    server = StandIn()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def tokenizer_once(monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = _tokenizer()
    monkeypatch.setattr(cli, "load_tokenizer", lambda path=None: tokenizer)


_TOKENIZER: list[Any] = []


def _tokenizer() -> Any:
    if not _TOKENIZER:
        _TOKENIZER.append(workloads.load_tokenizer(None))
    return _TOKENIZER[0]


def test_loadtest_run_replays_a_trace_as_recorded(stand_in, tmp_path, capsys):
    stand_in.serve(ttft_s=0.01, itl_s=0.005)
    trace = write_trace(tmp_path / "t.jsonl", TRACE)
    out = tmp_path / "run"
    argv = ["loadtest", "run", "--target", stand_in.target, "--workload", f"file:{trace}", "--arrival", "trace",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    records = read_jsonl(out / "requests.jsonl")
    assert [r.status for r in records] == ["ok"] * 4  # --num-requests 100: the trace's 4 lines, once
    sent = [r.sent_s - records[0].sent_s for r in records]
    assert all(t - 0.005 <= s <= t + 0.25 for s, t in zip(sent, TRACE, strict=True)), sent
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["arrival"] == "trace" and summary["request_rate"]["target"] is None

    sweep_out = tmp_path / "sweep"
    assert main(["loadtest", "sweep", "--rates", "10", *argv[2:-1], str(sweep_out)]) == 0
    records = read_jsonl(sweep_out / "rate-10" / "requests.jsonl")
    sent = [r.sent_s - records[0].sent_s for r in records]
    assert all(t / 2 - 0.005 <= s <= t / 2 + 0.25 for s, t in zip(sent, TRACE, strict=True)), sent


def test_loadtest_refuses_a_trace_without_arrival_s(stand_in, tmp_path, capsys):
    trace = write_trace(tmp_path / "t.jsonl", [0.0, None])
    argv = ["loadtest", "run", "--target", stand_in.target, "--workload", f"file:{trace}", "--arrival", "trace",
            "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert f"{trace}:2: --arrival trace needs \"arrival_s\"" in capsys.readouterr().err
    argv = ["loadtest", "run", "--target", stand_in.target, "--workload", "fixed:8/2", "--arrival", "trace",
            "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "workload fixed:8/2 has none" in capsys.readouterr().err


def test_simulate_replays_a_trace(tmp_path, capsys):
    from splitserve.latency import DecodeStepModel, PrefillModel
    from splitserve.sim.profile_files import SPLITSERVE_SCHEMA

    entry = {"kv_capacity_tokens": 20_000, "prefill": PrefillModel().to_coefficients(),
             "decode_step": DecodeStepModel().to_coefficients()}
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"schema": SPLITSERVE_SCHEMA, "model": "tiny", "device": "cpu", "tp": {"1": entry}}))
    trace = write_trace(tmp_path / "t.jsonl", TRACE)
    out = tmp_path / "sim"
    assert main(["simulate", "--profile", str(profile), "--workload", f"file:{trace}", "--arrival", "trace",
                 "--rates", "10", "--out", str(out)]) == 0
    records = read_jsonl(out / "rate-10" / "requests.jsonl")
    assert [r.sent_s for r in records] == pytest.approx([t / 2 for t in TRACE])
    assert main(["simulate", "--profile", str(profile), "--workload", "chat", "--arrival", "trace",
                 "--rates", "10", "--out", str(tmp_path / "sim2")]) == 2
    assert "workload chat has none" in capsys.readouterr().err
