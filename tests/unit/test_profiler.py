"""`splitserve profile` on the real model at its smallest budget: the file it writes is what
`load_profile` reads and `splitserve simulate` runs with; the grid it runs; bad flags end with a
sentence and status 2 before anything is measured. No test asserts on a measured speed."""

from __future__ import annotations

import json
import math

import pytest

from splitserve.cli import main
from splitserve.config import ProfileConfig
from splitserve.engine.engine import LoadedModel, StepStats
from splitserve.latency import DECODE_FEATURES, MIXED_FEATURES, PREFILL_FEATURES
from splitserve.loadtest.saved import load_results
from splitserve.profiler import cli as profile_cli
from splitserve.profiler.grid import make_grid, median_per_class
from splitserve.sim.profile_files import SPLITSERVE_SCHEMA, load_profile

SMALLEST = ["--repeats", "1", "--max-tokens", "16", "--max-batch", "1", "--threads", "1", "--num-kv-blocks", "64",
            "--transfer-tokens", "32"]


@pytest.fixture
def shared_model(monkeypatch: pytest.MonkeyPatch, loaded: LoadedModel) -> LoadedModel:
    """The command measures the session's model instead of loading its own (10 s on a busy CPU)."""
    monkeypatch.setattr(profile_cli, "_load", lambda config: loaded)
    return loaded


@pytest.fixture
def restore_threads():
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_profile_writes_a_file_that_simulate_runs_with(tmp_path, shared_model, restore_threads, capsys):
    out = tmp_path / "profile.json"
    assert main(["profile", "--out", str(out), *SMALLEST]) == 0
    printed = capsys.readouterr().out
    assert "decode_step" in printed and f"profile written to {out}" in printed
    data = json.loads(out.read_text())
    assert data["schema"] == SPLITSERVE_SCHEMA and data["model"] == "SmolLM2-135M-Instruct"
    entry = data["tp"]["1"]
    for name, features in (("prefill", PREFILL_FEATURES), ("decode_step", DECODE_FEATURES),
                           ("mixed_step", MIXED_FEATURES)):
        values = entry[name]
        assert set(values) == {*features, "r2", "rmse", "n"}, name
        assert all(math.isfinite(v) for v in values.values()), values
        assert values["n"] >= 2 and all(values[f] >= 0 for f in features)
    assert entry["kv_capacity_tokens"] == 64 * 16  # --num-kv-blocks of 16 tokens
    assert data["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4
    assert set(data["kv_transfer_bytes_per_s_by_backend"]) == {"collective", "grpc"}
    assert data["kv_transfer_backend"] == "collective"
    assert data["kv_transfer_bytes_per_s"] == data["kv_transfer_bytes_per_s_by_backend"]["collective"] > 0

    profile = load_profile(out)
    assert profile.has_transfer_cost and profile.at_tp(1).kv_capacity_tokens == entry["kv_capacity_tokens"]
    sim = tmp_path / "sim"
    argv = ["simulate", "--profile", str(out), "--workload", "fixed:32/4", "--num-requests", "5", "--rates", "1",
            "--out", str(sim)]
    assert main(argv) == 0
    results = load_results(sim)
    assert results.runs[0].summary["counts"]["ok"] == 5
    assert "bytes/token" in results.runs[0].summary["meta"]["simulator"]["kv_transfer"]


def test_profile_without_transfers_and_with_another_backend(tmp_path, shared_model, restore_threads):
    out = tmp_path / "p.json"
    assert main(["profile", "--out", str(out), *SMALLEST, "--transfer-backends", "none"]) == 0
    data = json.loads(out.read_text())
    assert "kv_transfer_bytes_per_s" not in data and "kv_bytes_per_token" not in data
    assert not load_profile(out).has_transfer_cost
    assert main(["profile", "--out", str(out), "--overwrite", *SMALLEST, "--transfer-backends", "grpc",
                 "--transfer-backend", "grpc"]) == 0
    data = json.loads(out.read_text())
    assert data["kv_transfer_backend"] == "grpc" and set(data["kv_transfer_bytes_per_s_by_backend"]) == {"grpc"}


@pytest.mark.parametrize("flags, message", [
    (["--tp", "2"], "tensor parallelism 1 only"),
    (["--transfer-backends", "grpc"], "--transfer-backend collective is not among --transfer-backends grpc"),
])
def test_contradictory_flags_are_refused_before_measuring(tmp_path, flags, message, capsys):
    out = tmp_path / "p.json"
    assert main(["profile", "--out", str(out), *flags]) == 2  # no model fixture: nothing may load
    assert message in capsys.readouterr().err and not out.exists()


def test_existing_or_unwritable_out_is_refused(tmp_path, capsys):
    existing = tmp_path / "p.json"
    existing.write_text("{}")
    assert main(["profile", "--out", str(existing)]) == 2
    assert "exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert main(["profile", "--out", str(tmp_path / "missing" / "p.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--repeats", "0"], ["--max-tokens", "8"], ["--transfer-backends", "nccl"],
                                   ["--transfer-backend", "nccl"], ["--threads", "0"]])
def test_malformed_flags_are_argparse_errors(tmp_path, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--out", str(tmp_path / "p.json"), *flags])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_profile_config_is_checked():
    with pytest.raises(ValueError, match="repeats must be a whole number >= 1"):
        ProfileConfig(repeats=0)
    with pytest.raises(ValueError, match="must be one of the measured backends"):
        ProfileConfig(transfer_backends=("grpc",), transfer_backend="collective")


def test_grid_spans_every_feature_within_its_limits():
    grid = make_grid(max_tokens=1024, max_batch=32, step_budget=1024, max_seqs=64, max_drafts=8)
    assert {t for _, t in grid.prefill} == {16, 32, 64, 128, 256, 512, 1024}
    assert {n for n, _ in grid.prefill} == {1, 4}
    assert {b for b, _, _ in grid.decode} == {1, 2, 4, 8, 16, 32}
    assert {c for _, c, _ in grid.decode} == {16, 64, 256, 1024}
    assert {k for _, _, k in grid.decode} == {0, 1, 2, 4}
    assert all(b * c <= 4 * 1024 for b, c, _ in grid.decode)
    assert {b for b, _ in grid.mixed} == {1, 4, 16} and {n for _, n in grid.mixed} == {16, 64, 256}
    smallest = make_grid(max_tokens=16, max_batch=1, step_budget=1024, max_seqs=64, max_drafts=0)
    assert smallest.prefill == ((1, 16), (4, 16)) and smallest.decode == ((1, 16, 0),)
    assert smallest.mixed == ((1, 16),)
    capped = make_grid(max_tokens=4096, max_batch=8, step_budget=512, max_seqs=4, max_drafts=2)
    assert max(t for _, t in capped.prefill) == 512 and max(b for b, _, _ in capped.decode) == 4
    assert {k for _, _, k in capped.decode} == {0, 1, 2} and max(b for b, _ in capped.mixed) == 4


def test_a_shape_s_steps_enter_the_fits_at_their_work_class_median():
    def step(seconds: float, requests: int, tokens: int, context: int, prompt_tokens: int = 0) -> StepStats:
        return StepStats(seconds, 0.0, requests, tokens, context, 0, 0, prompt_tokens)

    # a decode shape's context grows while it repeats; the slowed step is one of three alike
    decode = [step(0.010, 4, 4, 64), step(0.050, 4, 4, 68), step(0.012, 4, 4, 72)]
    assert [s.step_time for s in median_per_class(decode)] == [0.012] * 3
    assert [s.num_context_tokens for s in median_per_class(decode)] == [64, 68, 72]
    # a mixed shape alternates a chunk step with a plain decode step: each its own class
    mixed = [step(0.030, 2, 17, 16, 16), step(0.008, 1, 1, 33), step(0.034, 2, 17, 16, 16), step(0.009, 1, 1, 34),
             step(0.090, 2, 17, 16, 16)]
    assert [s.step_time for s in median_per_class(mixed)] == [0.034, 0.0085, 0.034, 0.0085, 0.034]


def test_reader_checks_the_per_backend_bandwidths(tmp_path):
    entry = {"kv_capacity_tokens": 100, "prefill": dict.fromkeys(PREFILL_FEATURES, 1e-3),
             "decode_step": dict.fromkeys(DECODE_FEATURES, 1e-3)}
    data = {"schema": SPLITSERVE_SCHEMA, "model": "m", "device": "cpu", "tp": {"1": entry}}
    data |= {"kv_bytes_per_token": 10, "kv_transfer_bytes_per_s": 2e9, "kv_transfer_backend": "grpc",
             "kv_transfer_bytes_per_s_by_backend": {"collective": 1e9, "grpc": 2e9}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    assert load_profile(path).kv_transfer_bytes_per_s == 2e9
    for change, message in (({"kv_transfer_backend": "collective"}, "must be the collective entry"),
                            ({"kv_transfer_backend": "nccl"}, "must name an entry"),
                            ({"kv_transfer_bytes_per_s_by_backend": {"grpc": 2e9, "x": -1}}, r"\.x must be"),
                            ({"kv_transfer_backend": None}, "must name an entry")):
        path.write_text(json.dumps(data | change))
        with pytest.raises(ValueError, match=message):
            load_profile(path)
