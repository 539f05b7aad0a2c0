"""`splitserve plan`'s search: the layouts it tries, goodput by binary search agreeing with a
sweep, pruning that keeps each mode's top exactly, one result per seed, and bad flags named."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest

from splitserve.cli import main
from splitserve.config import PlanConfig, SimConfig
from splitserve.loadtest.arrivals import parse_arrival
from splitserve.loadtest.metrics import SLO, summarize
from splitserve.loadtest.workloads import parse_workload
from splitserve.protocol import SLO as RequestSLO
from splitserve.sim.bounds import Work, lone_attainment
from splitserve.sim.plan_cli import deployment
from splitserve.sim.planner import Planner, attainment, layouts
from splitserve.sim.profile import LatencyProfile, MixedCoefficients
from splitserve.sim.results import to_records
from splitserve.sim.simulator import simulate
from splitserve.sim.trace import make_requests
from tests.unit.test_sim_cli import profile_path  # noqa: F401 (a fixture)
from tests.unit.test_sim_simulator import profile

SLO_ = SLO(400.0, 60.0)


def requests_at(rate: float, num_requests: int = 300):
    return make_requests(parse_workload("chat"), parse_arrival("poisson"), rate, num_requests, seed=2, scale=0.25)


def test_layouts_are_every_split_of_the_gpus():
    found = {c.describe() for c in layouts(profile(), PlanConfig(4, modes=("disaggregated", "colocated")))}
    assert "disaggregated 3P(TP1)+1D(TP1)" in found and "disaggregated 1P(TP2)+1D(TP2)" in found
    assert "disaggregated 2P(TP2)+1D(TP1)" not in found  # 5 GPUs
    assert {"colocated 4x(TP1) chunked", "colocated 1x(TP2) prefill-first"} <= found
    num_disaggregated = sum(d.startswith("disaggregated") for d in found)
    # (tp_p, tp_d) = (1, 1): P + D <= 4: 6 splits; (1, 2) and (2, 1): 2 each; (2, 2): 1
    assert num_disaggregated == 6 + 2 + 2 + 1
    assert sum(d.startswith("colocated") for d in found) == 2 * (4 + 2)


def test_elastic_layouts_are_instances_of_one_tp_starting_half_in_each_pool():
    found = [c.describe() for c in layouts(profile(), PlanConfig(4, modes=("elastic",)))]
    assert found == ["elastic 1P(TP1)+1D(TP1)", "elastic 1P(TP1)+2D(TP1)", "elastic 2P(TP1)+2D(TP1)",
                     "elastic 1P(TP2)+1D(TP2)"]


def test_an_elastic_layout_is_probed_against_the_plan_s_slo():
    """Elastic placement decides against each request's SLO: the planner's probes are what
    `simulate` gives for requests that carry the plan's SLO."""
    (search,) = Planner(profile(), PlanConfig(2, modes=("elastic",), top=1), requests_at, SLO_).run()
    for rate, both, first in search.probes:
        result = simulate(profile(), search.config, requests_at(rate), RequestSLO(0.4, 0.06))
        assert attainment(result, SLO_) == (both, first)


def test_elastic_is_planned_and_deployed_with_its_starting_split():
    searches = Planner(profile(), PlanConfig(2, modes=("elastic",), top=1), requests_at, SLO_).run()
    (search,) = searches
    assert search.config.mode == "elastic" and search.goodput > 0
    serve = deployment(search.config, SLO_)["serve"]
    assert "--mode elastic --prefill-workers 1 --decode-workers 1" in serve
    assert "--prefill-chunk-tokens" not in serve  # the default sizes
    wider = PlanConfig(2, modes=("elastic",), prefill_chunk_tokens=(2048, 512))
    (config,) = [c for c in layouts(profile(), wider) if c.num_prefill == 1 and c.num_decode == 1]
    assert config.placement.chunk_tokens == (2048, 512)
    assert "--prefill-chunk-tokens 2048,512" in deployment(config, SLO_)["serve"]
    assert config.placement.admission and "admission" not in deployment(config, SLO_)["serve"]
    (open_door,) = [c for c in layouts(profile(), replace(wider, admission=False)) if c.num_prefill == 1]
    assert not open_door.placement.admission and "--no-admission" in deployment(open_door, SLO_)["serve"]


def test_attainment_is_the_load_testers():
    result = simulate(profile(), SimConfig(num_prefill=1, num_decode=1), requests_at(20.0))
    summary = summarize(to_records(result), SLO(400.0, 20.0), target_rate=20.0)
    both, first = attainment(result, SLO(400.0, 20.0))
    assert (both, first) == (summary["attainment"]["joint"], summary["attainment"]["ttft"])
    assert 0 < both <= first < 1


def test_goodput_is_where_attainment_crosses_the_target():
    """The search's goodput passes, and a rate a tolerance above it fails (a sweep agrees)."""
    config = PlanConfig(3, modes=("disaggregated",), top=50, rate_tolerance=0.02)
    searches = Planner(profile(), config, requests_at, SLO_).run()
    for s in searches[:3]:
        assert s.goodput is not None and s.goodput > 0
        run = lambda rate, s=s: attainment(simulate(profile(), s.config, requests_at(rate)), SLO_)[0]  # noqa: E731
        assert run(s.goodput) >= 0.9
        assert run(s.upper) < 0.9 and s.upper <= s.goodput * 1.03


def test_pruning_keeps_each_modes_top():
    config = PlanConfig(4, top=2, num_requests=300)
    pruned = Planner(profile(), config, requests_at, SLO_).run()
    full = Planner(profile(), replace(config, top=1000), requests_at, SLO_).run()
    assert any(s.goodput is None for s in pruned) and all(s.goodput is not None for s in full)

    def tops(searches):
        by_mode: dict[str, list] = {}
        for s in searches:
            if s.goodput is not None:
                by_mode.setdefault(s.to_dict()["mode"], []).append((s.config.describe(), s.goodput))
        return {mode: sorted(v, key=lambda x: -x[1] / int(re.findall(r"\d+", x[0])[0] or 1))[:2]
                for mode, v in by_mode.items()}

    best_full = {m: [x for x in (s.to_dict() for s in full) if x["mode"] == m][:2] for m in tops(full)}
    best_pruned = {m: [x for x in (s.to_dict() for s in pruned) if x["mode"] == m][:2] for m in tops(full)}
    for mode in best_full:
        assert [(x["layout"], x["goodput"]) for x in best_pruned[mode]] == \
            [(x["layout"], x["goodput"]) for x in best_full[mode]]


def test_a_layout_missing_the_slos_alone_has_goodput_zero_without_a_run():
    tight = SLO(1.0, 60.0)  # no prefill takes 1 ms
    lengths = [(r.prompt_tokens, r.output_tokens) for r in requests_at(1.0)]
    assert lone_attainment(profile(), SimConfig(), lengths, tight) == 0.0
    (search, *_) = Planner(profile(), PlanConfig(2, modes=("disaggregated",)), requests_at, tight).run()
    assert search.goodput == 0.0 and search.probes == []


def test_one_seed_one_plan():
    config = PlanConfig(2, num_requests=200)
    runs = [[s.to_dict() | {"seconds": 0} for s in Planner(profile(), config, requests_at, SLO_).run()]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_plan_prints_the_winner_and_writes_the_search(tmp_path, profile_path, capsys):  # noqa: F811
    out = tmp_path / "plan.json"
    argv = ["plan", "--profile", str(profile_path), "--gpus", "2", "--workload", "chat", "--scale", "0.1",
            "--num-requests", "300", "--slo-ttft-ms", "300", "--slo-tpot-ms", "100", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["schema"] == "splitserve.plan/1" and report["num_layouts"] == len(report["layouts"])
    winner = report["winner"]
    assert winner["serve"].startswith("splitserve serve --mode ") and winner["serve"] in text
    assert set(report["best"]) == {"disaggregated", "colocated prefill-first", "colocated chunked"}
    if winner["mode"] == "disaggregated":
        assert winner["helm_values"]["prefill"]["replicas"] >= 1


@pytest.mark.parametrize(("flags", "message"), [
    ([], "give --slo-ttft-ms and/or --slo-tpot-ms"),
    (["--slo-ttft-ms", "100", "--attainment", "1.5"], r"--attainment is a share in \(0, 1\], got 1.5"),
    (["--slo-ttft-ms", "100", "--rate-tolerance", "2"], "--rate-tolerance must be below 1"),
    (["--slo-ttft-ms", "100", "--profile-model", "other"], "profiles 'tiny', not 'other'"),
])
def test_bad_flags_are_one_sentence_and_status_2(profile_path, capsys, flags, message):  # noqa: F811
    argv = ["plan", "--profile", str(profile_path), "--gpus", "2", "--num-requests", "10", "--quiet", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitserve plan: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


@pytest.mark.parametrize("flags", [["--gpus", "0"], ["--modes", "fast"], ["--colocated-schedulers", "fifo"]])
def test_malformed_flags_are_refused_by_the_parser(profile_path, flags):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--profile", str(profile_path), "--gpus", "2", "--slo-ttft-ms", "100", *flags])
    assert exit_info.value.code == 2


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = capsys.readouterr().out
    for flag in ("--profile ", "--profile-model", "--kv-capacity-csv", "--gpus", "--modes", "--colocated-schedulers",
                 "--max-batched-tokens", "--workload", "--num-requests", "--max-context-tokens", "--attainment",
                 "--min-rate", "--rate-tolerance", "--top", "--out", "--slo-ttft-ms", "--slo-tpot-ms"):
        assert flag in text


@pytest.mark.parametrize(("changes", "message"), [
    ({"num_gpus": 0}, "num_gpus must be >= 1"), ({"modes": ("fast",)}, "modes must be some of"),
    ({"attainment": 0.0}, "attainment must be in"), ({"rate_tolerance": 1.0}, "rate_tolerance must be in"),
    ({"min_rate": 0.0}, "min_rate must be a positive"),
])
def test_bad_plan_configs_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        PlanConfig(**{"num_gpus": 2, **changes})


def test_an_unknown_mode_is_an_argparse_error(profile_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--profile", str(profile_path), "--gpus", "2", "--slo-ttft-ms", "100", "--modes", "hybrid"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "expected a comma-separated list of disaggregated, colocated, elastic, got 'hybrid'" in err


def fitted(p: LatencyProfile) -> LatencyProfile:
    """``p`` with a fitted mixed-step model at every TP (as `splitserve profile` writes): then no
    layout running mixed steps has a work bound."""
    mixed = MixedCoefficients(20.0, 0.5, 0.04, 0.1, 7e-6, 6e-4)
    return replace(p, instances=tuple(replace(i, mixed=mixed) for i in p.instances))


@pytest.mark.parametrize("bounded", [True, False], ids=["work bound", "no bound"])
def test_pruning_keeps_the_elastic_top(bounded: bool):
    """With no work bound (a fitted mixed model), the doubling's first rate is no upper end, so a
    layout searched after better ones is not pruned on it; with one, the bound prunes."""
    p = profile() if bounded else fitted(profile())
    # A tight SLO fails at rates few requests can show (cheap probes); a coarse search is as exact.
    slo, n = SLO(300.0, 40.0), 150
    config = PlanConfig(4, modes=("elastic",), top=1, num_requests=n, admission=False, rate_tolerance=0.1)
    assert all(math.isinf(Work.of(p, [(100, 10)]).bound(p, c)) != bounded for c in layouts(p, config))
    pruned = Planner(p, config, lambda rate: requests_at(rate, n), slo).run()
    full = Planner(p, replace(config, top=1000), lambda rate: requests_at(rate, n), slo).run()
    best = [(s.config.describe(), s.goodput) for s in pruned[:1]]
    assert best == [(s.config.describe(), s.goodput) for s in full[:1]]


def test_an_elastic_layout_is_bounded_as_chunked_instances_are_and_does_not_beat_it():
    p, lengths = profile(), [(r.prompt_tokens, r.output_tokens) for r in requests_at(1.0)]
    work = Work.of(p, lengths)
    elastic = SimConfig(mode="elastic", num_prefill=1, prefill_tp=1, num_decode=2, decode_tp=1)
    chunked = SimConfig(mode="colocated", num_instances=3, tp=1, colocated_scheduler="chunked")
    bound = work.bound(p, elastic)
    assert bound == work.bound(p, chunked) < math.inf
    result = simulate(p, elastic, requests_at(3 * bound))  # far past it: the backlog shows the rate served
    served = len(result.jobs) / max(job.finish_s for job in result.jobs)
    assert all(job.refusal is None for job in result.jobs) and served < bound
