"""Latency profiles for the simulator: DistServe's published A100 profile and splitserve's own
format, read into the formulas the simulator times its iterations with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from splitserve.latency import DecodeStepModel, MixedStepModel, PrefillModel
from splitserve.sim.profile import DecodeCoefficients, InstanceProfile, Triple
from splitserve.sim.profile_files import SPLITSERVE_SCHEMA, load_profile

DISTSERVE = Path(__file__).resolve().parents[3] / "shared" / "data" / "distserve"
needs_distserve = pytest.mark.skipif(not (DISTSERVE / "max_num_tokens.csv").is_file(),
                                     reason=f"DistServe's profile data is not at {DISTSERVE} (the repo's ../shared)")


@needs_distserve
@pytest.mark.parametrize(("engine", "prefill_512", "decode_1", "decode_64"),
                         [("distserve", 72, 20, 43), ("vllm", 96, 24, 47)])
def test_distserve_sanity_values(engine, prefill_512, decode_1, decode_64):
    """The README's values for OPT-13B TP1: a 512-token prompt, and decode at 512 context."""
    opt13b = load_profile(DISTSERVE / f"profiler-a100-80g.{engine}.json", "facebook/opt-13b").at_tp(1)
    assert round(opt13b.prefill_ms([512])) == prefill_512
    assert round(opt13b.decode_ms(1, 513)) == decode_1
    assert round(opt13b.decode_ms(64, 64 * 513)) == decode_64


@needs_distserve
def test_distserve_profile_has_the_csv_capacities_and_threshold():
    opt13b = load_profile(DISTSERVE / "profiler-a100-80g.distserve.json", "facebook/opt-13b")
    assert opt13b.tp_degrees == [1, 2, 4]
    assert [opt13b.at_tp(tp).kv_capacity_tokens for tp in (1, 2, 4)] == [66144, 163008, 356736]
    assert opt13b.at_tp(1).decode.threshold == 95
    assert not opt13b.has_transfer_cost and opt13b.transfer_s(10_000) == 0.0
    opt66b = load_profile(DISTSERVE / "profiler-a100-80g.distserve.json", "facebook/opt-66b")
    assert opt66b.tp_degrees == [2, 3, 4, 8]
    assert opt66b.at_tp(8).kv_capacity_tokens == 212304  # the last line of the file has no newline after it
    with pytest.raises(ValueError, match=r"no profile for TP 1 \(it has TP 2, 3, 4, 8\)"):
        opt66b.at_tp(1)


def test_decode_switches_triples_at_the_threshold():
    small, large = Triple(10.0, 0.01, 1.0), Triple(5.0, 0.02, 2.0)
    decode = DecodeCoefficients(small, large, threshold=95)
    assert decode.step_ms(94, 1000) == 10.0 + 0.01 * 1000 + 1.0 * 94
    assert decode.step_ms(95, 1000) == 5.0 + 0.02 * 1000 + 2.0 * 95


@needs_distserve
@pytest.mark.parametrize(("model", "message"), [
    (None, "profiles several models .*opt-13b.*opt-66b.*; name one"),
    ("facebook/opt-175b", "has no model 'facebook/opt-175b'"),
])
def test_distserve_model_must_be_named_and_present(model, message):
    with pytest.raises(ValueError, match=message):
        load_profile(DISTSERVE / "profiler-a100-80g.distserve.json", model)


def _distserve_copy(tmp_path: Path, edit=None, csv: str | None = None) -> Path:
    data = json.loads((DISTSERVE / "profiler-a100-80g.distserve.json").read_text())
    if edit is not None:
        edit(data)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    if csv is None:
        shutil.copy(DISTSERVE / "max_num_tokens.csv", tmp_path / "max_num_tokens.csv")
    else:
        (tmp_path / "max_num_tokens.csv").write_text(csv)
    return path


@needs_distserve
@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["facebook/opt-13b"]["1"].pop("decoding_largebs"), r"opt-13b TP 1: missing \['decoding_largebs'\]"),
    (lambda d: d["facebook/opt-13b"]["2"].update(prefill=[1.0, 2.0]), r"opt-13b TP 2: prefill: expected a list of 3"),
    (lambda d: d["facebook/opt-13b"]["2"].update(prefill=[1.0, "x", 2.0]), r"TP 2: prefill: expected 3 finite"),
    (lambda d: d["facebook/opt-13b"]["4"].update(decoding_large_small_bs_threshold=0),
     "TP 4: decoding_large_small_bs_threshold must be a whole number >= 1"),
    (lambda d: d["facebook/opt-13b"]["1"].update(prefill=[-1.0, 0.1, 0.0]),
     "TP 1: prefill coefficients must not make a step cheaper than free"),
    (lambda d: d["facebook/opt-13b"].update({"x": d["facebook/opt-13b"]["1"]}), "TP degree keys must be whole numbers"),
    (lambda d: d["facebook/opt-13b"].update({"3": d["facebook/opt-13b"]["1"]}),
     "has no KV capacity for facebook/opt-13b TP 3 PP 1"),
])
def test_bad_distserve_profiles_name_the_field(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load_profile(_distserve_copy(tmp_path, edit), "facebook/opt-13b")


@needs_distserve
@pytest.mark.parametrize(("csv", "message"), [
    ("model,tp,max_num_tokens\nfacebook/opt-13b,1,66144", "expected the header model,tp,pp,max_num_tokens"),
    ("model,tp,pp,max_num_tokens\nfacebook/opt-13b,1,1,lots", r"max_num_tokens.csv:2: expected model,tp,pp"),
    ("model,tp,pp,max_num_tokens\nfacebook/opt-66b,2,1,11600", "no KV capacity for model 'facebook/opt-13b'"),
])
def test_bad_kv_capacity_files_say_where(tmp_path, csv, message):
    with pytest.raises(ValueError, match=message):
        load_profile(_distserve_copy(tmp_path, csv=csv), "facebook/opt-13b")


@needs_distserve
def test_missing_kv_capacity_file_is_named(tmp_path):
    path = tmp_path / "profile.json"
    shutil.copy(DISTSERVE / "profiler-a100-80g.distserve.json", path)
    with pytest.raises(ValueError, match="KV capacity file .*max_num_tokens.csv cannot be read"):
        load_profile(path, "facebook/opt-13b")
    profile = load_profile(path, "facebook/opt-13b", kv_capacity_csv=DISTSERVE / "max_num_tokens.csv")
    assert profile.at_tp(2).kv_capacity_tokens == 163008


def test_unreadable_profiles_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_profile(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json cannot be read as JSON"):
        load_profile(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "someone.else/2"}))
    with pytest.raises(ValueError, match="unknown profile schema 'someone.else/2'"):
        load_profile(tmp_path / "other.json")


# ------------------------------------------------------------------------ splitserve's own format


def _fitted_models() -> tuple[PrefillModel, DecodeStepModel, MixedStepModel]:
    """Models fitted the way workers fit them (here from a few synthetic steps)."""
    prefill = PrefillModel()
    for n in (16, 64, 256, 512):
        prefill.add(n, 0.004 + 2e-4 * n + 3e-8 * n * n)
    return prefill, DecodeStepModel(), MixedStepModel()


def _splitserve_profile(tmp_path: Path, **changes) -> Path:
    prefill, decode, mixed = _fitted_models()
    entry = {"kv_capacity_tokens": 50_000, "prefill": prefill.to_coefficients(),
             "decode_step": decode.to_coefficients(), "mixed_step": mixed.to_coefficients()}
    data = {"schema": SPLITSERVE_SCHEMA, "model": "SmolLM2-135M-Instruct", "device": "cpu", "tp": {"1": entry},
            "kv_bytes_per_token": 18432, "kv_transfer_bytes_per_s": 1e9}
    for key, value in changes.items():
        if key in entry:
            entry[key] = value
        elif value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    return path


def test_splitserve_profile_predicts_what_the_fitted_models_predict(tmp_path):
    prefill, decode, mixed = _fitted_models()
    profile = load_profile(_splitserve_profile(tmp_path))
    instance = profile.at_tp(1)
    assert (profile.model, profile.device, instance.kv_capacity_tokens) == ("SmolLM2-135M-Instruct", "cpu", 50_000)
    for n in (1, 100, 700):
        assert instance.prefill_ms([n]) == pytest.approx(prefill.predict(n) * 1e3, rel=1e-12)
    for batch, context in ((1, 100), (7, 4000), (40, 30_000)):  # context: sum(C_i), the engine's count
        assert instance.decode_ms(batch, context + batch) == pytest.approx(
            decode.predict(batch, batch, context) * 1e3, rel=1e-12)
        assert instance.mixed_ms(batch, context + batch, [(128, 256)]) == pytest.approx(
            mixed.predict(batch, 0, context, 128, 256) * 1e3, rel=1e-12)
    assert profile.transfer_s(1000) == pytest.approx(1000 * 18432 / 1e9)


@pytest.mark.parametrize(("changes", "message"), [
    ({"model": ""}, "'model' must be a non-empty string"),
    ({"tp": {}}, "'tp' must be an object of TP degrees"),
    ({"kv_capacity_tokens": 0}, "tp 1: kv_capacity_tokens must be a whole number >= 1, got 0"),
    ({"prefill": {"const": 0.1, "tokens": 0.1}}, r"tp 1: prefill: missing coefficients \['tokens_sq'\]"),
    ({"decode_step": {**DecodeStepModel().to_coefficients(), "requests": -1.0}},
     "tp 1: decode_step: coefficient 'requests' must be a finite number >= 0"),
    ({"kv_transfer_bytes_per_s": None}, "give both kv_bytes_per_token and kv_transfer_bytes_per_s, or neither"),
    ({"kv_bytes_per_token": 0}, "kv_bytes_per_token must be a number > 0"),
])
def test_bad_splitserve_profiles_name_the_field(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_profile(_splitserve_profile(tmp_path, **changes))


def test_splitserve_profile_without_mixed_model_or_transfer(tmp_path):
    path = _splitserve_profile(tmp_path, mixed_step=None, kv_bytes_per_token=None, kv_transfer_bytes_per_s=None)
    profile = load_profile(path)
    assert profile.at_tp(1).mixed is None and not profile.has_transfer_cost
    with pytest.raises(ValueError, match="profiles 'SmolLM2-135M-Instruct', not 'other'"):
        load_profile(path, "other")


def test_instance_profile_checks_its_values():
    prefill, decode = Triple(1.0, 0.1, 0.0), DecodeCoefficients(Triple(1.0, 0.1, 0.1), Triple(1.0, 0.1, 0.1), 95)
    with pytest.raises(ValueError, match="kv_capacity_tokens must be >= 1"):
        InstanceProfile(1, prefill, decode, 0)
    with pytest.raises(ValueError, match="TP degree must be >= 1"):
        InstanceProfile(0, prefill, decode, 100)
