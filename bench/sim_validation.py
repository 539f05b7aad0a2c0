"""The simulator against measured runs: replay a bench.goodput run's seeded workloads through
``splitserve.sim`` on a latency profile taken on the same machine, and compare attainment per
rate (RMSE in points), goodput and the systems' order with what was measured.

    python -m bench.sim_validation --goodput-dir bench/results/goodput-run9 --profile PROFILE.json \\
        [--profile PROFILE-2THREADS.json] [--out DIR]

For every workload, round and splitserve system of the run (goodput.json), the same requests
are simulated: the sweep's recorded workload, scale, length caps, arrival process, seed, rates,
number of requests and --duration cut (the requests the load tester sent: an arrival at or after
--duration is not sent), and the server's own configuration, read by parsing its recorded
``splitserve serve`` command line with serve's parser (``serve_cli.configs``):

- ``--mode elastic``: elastic, the starting split of its workers, its PlacementConfig (--admission,
  --prefill-chunk-tokens) and RoleConfig; requests carry the SLO the sweep sent (its summary's
  ``slo_sent``), else the server's default SLO;
- ``--mode disaggregated``: P prefill + D decode instances, the decode instance chosen at arrival
  with the prefill one (``decode_choice="arrival"``: the router's order), prefill instances
  running the engine's steps (``prefill_batching="chunked"``); a system that sent its SLO (SLO
  admission) is skipped: the simulator's disaggregated mode admits everything;
- ``--mode colocated``: N instances with the engine's chunked scheduler;
- every mode: the engine's --max-num-batched-tokens and max_num_seqs, and --num-kv-blocks
  (times the block size) as the KV capacity where given (else the profile's: the same 1 GiB
  default).

A profile serves the systems whose --threads-per-worker equals the threads it was measured with
(``measured.threads``; a profile without it serves every system); a system no profile serves is
skipped with a note. vLLM is not simulated (the simulator models splitserve's engine and
router). Not modelled (docs/simulator.md): speculation, prefix caching, preemption, router and
HTTP overheads, the workers' contention for the machine's cores (the profile is taken with
the engine alone), a real decode worker's refusal of a reservation.

Writes ``--out`` (default ``<goodput-dir>/sim-validation``): ``sim_validation.json`` (per
workload: each system's measured and simulated attainment per rate, RMSE, goodput, median TTFT
and TPOT; the order) and ``sim_validation.png`` (attainment against rate, measured solid,
simulated dashed); prints the tables. Scoring and comparison: bench/goodput_scores.py and
bench/sim_validation_scores.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from bench.common import ROOT, command_line, git_revision, markdown_table
from bench.goodput_report import dumps
from bench.goodput_scores import request_rows, score_workload
from bench.sim_validation_scores import compare, format_goodput
from splitserve.config import ClusterConfig, EngineConfig, SimConfig
from splitserve.loadtest.arrivals import parse_arrival
from splitserve.loadtest.workloads import LengthLimits, parse_workload
from splitserve.protocol import SLO
from splitserve.sim.profile import LatencyProfile
from splitserve.sim.profile_files import load_profile
from splitserve.sim.results import to_records
from splitserve.sim.simulator import simulate
from splitserve.sim.trace import SimRequest, make_requests

RESAMPLES = 10  # score_workload's bootstrap is not used here; a few resamples keep it quick


@dataclasses.dataclass(frozen=True)
class Replay:
    """One system as the simulator runs it: its cluster, the profile, and the SLO of requests that
    carry none (the server's default)."""

    config: SimConfig
    profile: LatencyProfile
    default_slo: SLO
    notes: tuple[str, ...] = ()  # what of the server the simulation leaves out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sim_validation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--goodput-dir", type=Path, required=True, help="a bench.goodput --out folder (goodput.json)")
    p.add_argument("--profile", type=Path, action="append", required=True, metavar="FILE",
                   help="a `splitserve profile` JSON; repeat for profiles of other --threads")
    p.add_argument("--out", type=Path, default=None, help="default: <goodput-dir>/sim-validation")
    return p.parse_args()


# ------------------------------------------------------------------------------ systems

def profiles_by_threads(paths: list[Path]) -> dict[int | None, LatencyProfile]:
    """Each profile under the threads it was measured with (None: not recorded, any)."""
    out = {}
    for path in paths:
        measured = json.loads(path.read_text()).get("measured", {})
        threads = measured.get("threads")
        if threads in out:
            raise ValueError(f"two profiles measured with {threads} threads: {out[threads].source} and {path}")
        out[threads] = load_profile(path)
    return out


def replay_of(system: dict, profiles: dict[int | None, LatencyProfile],
              num_cpus: int | None = None) -> Replay | str:
    """How the simulator runs a system of the run (its recorded command line), or why it cannot
    (``num_cpus``: the machine's, which a server without --threads-per-worker splits)."""
    from splitserve.cli import build_parser
    from splitserve.serve_cli import configs

    command = system["command"]
    if len(command) < 2 or command[1] != "serve" or not Path(command[0]).name.startswith("splitserve"):
        return "not a splitserve server (the simulator models splitserve's engine and router)"
    cluster, serve = configs(build_parser().parse_args(command[1:]))
    if cluster.mode == "disaggregated" and system.get("send_slo"):
        return "SLO admission in disaggregated mode is not simulated (every request is served)"
    if cluster.decode_engine is not None:
        return "speculative decoding is not simulated"
    threads = cluster.num_threads or _threads_per_worker(cluster, num_cpus)
    profile = profiles.get(threads, profiles.get(None))
    if profile is None:
        return f"no profile measured with {threads} threads per worker"
    engine = cluster.engine
    if engine.num_kv_blocks is not None:
        profile = with_kv_capacity(profile, engine.num_kv_blocks * engine.block_size)
    counts = cluster.worker_counts()
    common = {"max_batched_tokens": engine.max_num_batched_tokens, "max_num_seqs": engine.max_num_seqs}
    if cluster.mode == "colocated":
        config = SimConfig(mode="colocated", num_instances=counts["colocated"], colocated_scheduler="chunked",
                           **common)
    elif cluster.mode == "disaggregated":
        config = SimConfig(mode="disaggregated", num_prefill=counts["prefill"], num_decode=counts["decode"],
                           decode_choice="arrival", prefill_batching="chunked", **common)
    else:
        config = SimConfig(mode="elastic", num_prefill=counts["prefill"], num_decode=counts["decode"],
                           placement=serve.placement, roles=serve.roles, **common)
    default = SLO(serve.slo_ttft_s, serve.slo_tpot_s)
    notes = ("prefix caching is on in the server, not in the simulation",) if engine.enable_prefix_caching else ()
    return Replay(config, profile, default, notes)


def _threads_per_worker(cluster: ClusterConfig, num_cpus: int | None) -> int | None:
    """As ClusterConfig.worker_configs gives them when --threads-per-worker is not set."""
    if cluster.cpus_per_worker is not None:
        return max(int(cluster.cpus_per_worker), 1)
    return None if num_cpus is None else max(num_cpus // sum(cluster.worker_counts().values()), 1)


def with_kv_capacity(profile: LatencyProfile, tokens: int) -> LatencyProfile:
    instances = tuple(dataclasses.replace(i, kv_capacity_tokens=tokens) for i in profile.instances)
    return dataclasses.replace(profile, instances=instances)


# ------------------------------------------------------------------------------ requests

def sent_requests(meta: dict, rate: float) -> list[SimRequest]:
    """The requests a sweep (its summary's ``meta``) sent at ``rate``: lengths and arrivals of
    its seed, those arriving before its --duration."""
    limits = LengthLimits(max_prompt_tokens=meta["max_prompt_tokens"], max_output_tokens=meta["max_output_tokens"])
    requests = make_requests(parse_workload(meta["workload"]), parse_arrival(meta["arrival"]), rate,
                             meta["num_requests"], seed=meta["seed"], scale=meta["scale"], limits=limits)
    duration = meta.get("duration_s")
    return [r for r in requests if duration is None or r.arrival_s < duration]


def request_slo(meta: dict, default: SLO) -> SLO:
    """The SLO the sweep's requests carried: what it sent (``slo_sent``), else the server's default."""
    if not meta.get("slo_sent"):
        return default
    ms = meta["slo"]
    return SLO(*(None if ms.get(k) is None else ms[k] / 1e3 for k in ("ttft_ms", "tpot_ms")))


def check_sent(requests: list[SimRequest], sent: list[list] | None, where: str) -> None:
    """The replayed requests against the lengths and offsets the run recorded (bench.goodput keeps
    them since this script; older runs have none to check)."""
    if sent is None:
        return
    replayed = [[r.index, r.prompt_tokens, r.output_tokens] for r in requests]
    recorded = [[index, prompt, output] for index, _, prompt, output in sent]
    if replayed != recorded or any(abs(r.arrival_s - s[1]) > 1e-6 for r, s in zip(requests, sent)):
        raise ValueError(f"{where}: the replayed requests differ from those the run recorded (another loadtest "
                         "version?)")


# ------------------------------------------------------------------------------ replay

def simulated_workload(workload: dict, replays: dict[str, Replay]) -> dict:
    """The workload's entry as bench.goodput writes it, with simulated requests' rows instead."""
    rounds = []
    for r in workload["rounds"]:
        systems = {}
        for name, entry in r["systems"].items():
            if name not in replays or "sweep" not in entry:
                continue
            replay, meta = replays[name], entry["sweep"]["meta"]
            rows = {}
            for rate in entry["requests"]:
                requests = sent_requests(meta, float(rate))
                check_sent(requests, entry.get("sent", {}).get(rate), f"round {r['round']} {name} rate {rate}")
                result = simulate(replay.profile, replay.config, requests, request_slo(meta, replay.default_slo))
                rows[rate] = request_rows(to_records(result))
            systems[name] = {"requests": rows}
        rounds.append({"round": r["round"], "seed": r["seed"], "systems": systems})
    return {"slo": workload["slo"], "rounds": rounds}


def validate(result: dict, profiles: dict[int | None, LatencyProfile]) -> dict:
    """Per workload: the comparison (bench/sim_validation_scores.compare) and what was skipped."""
    out = {}
    for name, workload in result["workloads"].items():
        replays, skipped = {}, {}
        for system, described in result["systems"].items():
            replay = replay_of(described, profiles, result.get("machine", {}).get("nproc"))
            if isinstance(replay, str):
                skipped[system] = replay
            else:
                replays[system] = replay
        simulated = simulated_workload(workload, replays)
        measured_scores = {s: score_workload(workload, [s], RESAMPLES)["systems"][s] for s in replays}
        simulated_scores = {s: score_workload(simulated, [s], RESAMPLES)["systems"][s] for s in replays}
        out[name] = compare(measured_scores, simulated_scores) | {
            "skipped": skipped, "clusters": {s: r.config.describe() for s, r in replays.items()},
            "notes": {s: list(r.notes) for s, r in replays.items() if r.notes}}
        for system, entry in out[name]["systems"].items():
            entry["median_ms"] = {"measured": median_latencies(workload, system),
                                  "simulated": median_latencies(simulated, system)}
    return out


def median_latencies(workload: dict, system: str) -> dict[str, float | None]:
    """The system's median TTFT and TPOT (ms) over every round and rate (served requests only):
    where a disagreement in attainment comes from."""
    rows = [row for r in workload["rounds"] for rows in r["systems"].get(system, {}).get("requests", {}).values()
            for row in rows if row[1] is not None]
    return {"ttft": _median([row[1] for row in rows]), "tpot": _median([row[2] for row in rows])}


def _median(values: list[float]) -> float | None:
    return 1e3 * float(np.median(values)) if values else None


# ------------------------------------------------------------------------------ report

def tables(validation: dict) -> str:
    parts = []
    for name, w in validation.items():
        rows = []
        for system, s in w["systems"].items():
            for rate, a in s["rates"].items():
                rows.append([system, rate, f"{100 * a['measured']:.0f}%", f"{100 * a['simulated']:.0f}%",
                             f"{100 * (a['simulated'] - a['measured']):+.0f}"])
        parts.append(f"### {name}\n\n" + markdown_table(["system", "rate (req/s)", "measured", "simulated",
                                                          "error (points)"], rows))
        summary = [[system, f"{s['rmse_points']:.1f}" if s["rmse_points"] is not None else "-",
                    format_goodput(s["goodput_rps"]["measured"]), format_goodput(s["goodput_rps"]["simulated"]),
                    *(_ms(s["median_ms"][side][what]) for what in ("ttft", "tpot")
                      for side in ("measured", "simulated"))]
                   for system, s in w["systems"].items()]
        overall = "-" if w["rmse_points"] is None else f"{w['rmse_points']:.1f}"
        summary.append(["all", overall, "", "", "", "", "", ""])
        parts.append(markdown_table(["system", "RMSE (points)", "goodput measured", "goodput simulated",
                                     "TTFT p50 measured", "simulated", "TPOT p50 measured", "simulated"], summary))
        order = w["order"]
        parts.append(f"order measured: {' > '.join(order['measured'])}; simulated: {' > '.join(order['simulated'])}"
                     f" ({'same' if order['matches'] else 'differs'}; {order['pairs_agreeing']} of {order['pairs']}"
                     " pairs agree)")
        lines = [f"simulated {system} as {cluster}" for system, cluster in w["clusters"].items()]
        lines += [f"note on {system}: {note}" for system, notes in w["notes"].items() for note in notes]
        lines += [f"skipped {system}: {why}" for system, why in w["skipped"].items()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def plot(validation: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(validation), 4.5))
    FigureCanvasAgg(fig)
    for i, (name, w) in enumerate(validation.items()):
        ax = fig.add_subplot(1, len(validation), i + 1)
        for j, (system, s) in enumerate(w["systems"].items()):
            rates = [float(r) for r in s["rates"]]
            color = f"C{j}"
            ax.plot(rates, [100 * a["measured"] for a in s["rates"].values()], "o-", color=color,
                    label=f"{system} measured")
            ax.plot(rates, [100 * a["simulated"] for a in s["rates"].values()], "s--", color=color,
                    label=f"simulated (RMSE {s['rmse_points']:.0f} pts)")
        ax.axhline(90, color="gray", linewidth=0.8, linestyle=":")
        ax.set(title=f"{name}: measured vs simulated", xlabel="rate (req/s)", ylabel="SLO attainment (%)",
               ylim=(-5, 105))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = parse_args()
    result = json.loads((args.goodput_dir / "goodput.json").read_text())
    profiles = profiles_by_threads(args.profile)
    validation = validate(result, profiles)
    out = args.out or args.goodput_dir / "sim-validation"
    out.mkdir(parents=True, exist_ok=True)
    saved = {"benchmark": "sim_validation", "command": command_line(), "revision": git_revision(ROOT),
             "goodput_dir": str(args.goodput_dir), "goodput_revision": result.get("revision"),
             "profiles": {str(t): p.source for t, p in profiles.items()},
             "engine_defaults": _engine_defaults(), "workloads": validation}
    (out / "sim_validation.json").write_text(dumps(saved) + "\n")
    plot(validation, out / "sim_validation.png")
    print(tables(validation))
    print(f"\nwrote {out / 'sim_validation.json'} and sim_validation.png")


def _engine_defaults() -> dict:
    e = EngineConfig()
    return {"max_num_batched_tokens": e.max_num_batched_tokens, "block_size": e.block_size,
            "kv_cache_bytes": e.kv_cache_bytes}


if __name__ == "__main__":
    main()
