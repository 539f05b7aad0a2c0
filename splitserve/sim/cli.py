"""`splitserve simulate`: a load test sweep served by the simulator instead of a server.

It reads a latency profile, builds the cluster from the flags, makes the load tester's requests
for each rate (same workload, arrival process and seed as ``splitserve loadtest sweep``) and
writes the results in that command's layout and schema, so ``splitserve loadtest report DIR``
prints them. Bad flags or profiles end with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from splitserve.config import PlacementConfig, RoleConfig, SimConfig, field_default
from splitserve.loadtest.arguments import count, parsed, positive, rates, sizes
from splitserve.loadtest.arrivals import parse_arrival
from splitserve.loadtest.metrics import SLO
from splitserve.loadtest.workloads import LengthLimits, parse_workload
from splitserve.sim.outcome import SimResult
from splitserve.sim.planner import request_slo
from splitserve.sim.profile import LatencyProfile
from splitserve.sim.profile_files import load_profile
from splitserve.sim.results import simulate_sweep
from splitserve.sim.simulator import simulate
from splitserve.sim.trace import SimRequest, make_requests

_PROG = "splitserve simulate"
_DISAGGREGATED_FLAGS = {"prefill_instances": "--prefill-instances", "prefill_tp": "--prefill-tp",
                        "decode_instances": "--decode-instances", "decode_tp": "--decode-tp"}
_COLOCATED_FLAGS = {"instances": "--instances", "tp": "--tp", "colocated_scheduler": "--colocated-scheduler"}
_ELASTIC_FLAGS = {"role_interval_s": "--role-interval-s", "role_dwell_s": "--role-dwell-s",
                  "role_hysteresis": "--role-hysteresis", "fixed_roles": "--fixed-roles",
                  "prefill_chunk_tokens": "--prefill-chunk-tokens", "admission": "--admission/--no-admission"}
_MODE_FLAGS = {"disaggregated": _DISAGGREGATED_FLAGS | {"decode_choice": "--decode-choice",
                                                         "prefill_batching": "--prefill-batching"},
               "colocated": _COLOCATED_FLAGS,
               "elastic": _DISAGGREGATED_FLAGS | _ELASTIC_FLAGS}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `simulate` on splitserve's command parser."""
    summary = "simulate a load test sweep on a cluster described by a latency profile (no GPUs, no server)"
    parser = commands.add_parser("simulate", help=summary, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_profile_options(parser)
    parser.add_argument("--mode", choices=("disaggregated", "colocated", "elastic"),
                        default=field_default(SimConfig, "mode"),
                        help="prefill and decode on separate instances, both on each, or elastic: the router "
                        "places each request (remote prefill, or end to end on one instance; refused when no "
                        "placement meets --slo-*) and moves instances between the pools (default: %(default)s)")
    group = parser.add_argument_group("disaggregated and elastic modes (elastic: the starting split)")
    group.add_argument("--prefill-instances", type=count(1), default=None, metavar="P",
                       help=f"prefill instances (default: {field_default(SimConfig, 'num_prefill')})")
    group.add_argument("--prefill-tp", type=count(1), default=None, metavar="T",
                       help=f"TP degree of each prefill instance (default: {field_default(SimConfig, 'prefill_tp')})")
    group.add_argument("--decode-instances", type=count(1), default=None, metavar="D",
                       help=f"decode instances (default: {field_default(SimConfig, 'num_decode')})")
    group.add_argument("--decode-tp", type=count(1), default=None, metavar="T",
                       help=f"TP degree of each decode instance (default: {field_default(SimConfig, 'decode_tp')})")
    parser.add_argument("--decode-choice", choices=("prefill-end", "arrival"), default=None,
                        help="disaggregated: choose a request's decode instance when its prefill ends (DistServe's "
                        "order) or at its arrival, with its prefill instance (splitserve's router) (default: "
                        f"{field_default(SimConfig, 'decode_choice')})")
    parser.add_argument("--prefill-batching", choices=("whole-prompts", "chunked"), default=None,
                        help="disaggregated: a prefill instance's batch is whole prompts within its KV capacity "
                        "(DistServe's) or an engine step of prompt chunks, --max-batched-tokens at most (default: "
                        f"{field_default(SimConfig, 'prefill_batching')})")
    group = parser.add_argument_group("elastic mode: role changes (splitserve.router.roles)")
    group.add_argument("--role-interval-s", type=positive(float), default=None, metavar="S",
                       help=f"seconds between role decisions (default: {field_default(RoleConfig, 'interval_s')})")
    group.add_argument("--role-dwell-s", type=non_negative, default=None, metavar="S",
                       help=f"least seconds between two moves (default: {field_default(RoleConfig, 'min_dwell_s')})")
    group.add_argument("--role-hysteresis", type=non_negative, default=None, metavar="X",
                       help="workers beyond 0.5 the split must be off balance before one moves (default: "
                       f"{field_default(RoleConfig, 'hysteresis')})")
    group.add_argument("--fixed-roles", action="store_const", const=True, default=None,
                       help="keep the starting split (default: roles follow the load)")
    group.add_argument("--prefill-chunk-tokens", type=sizes, default=None, metavar="SIZES",
                       help="the prefill chunk sizes a placement may use, as serve's flag (each iteration still "
                       "holds at most --max-batched-tokens) (default: "
                       f"{','.join(map(str, field_default(PlacementConfig, 'chunk_tokens')))})")
    is_on = field_default(PlacementConfig, "admission")
    group.add_argument("--admission", action=argparse.BooleanOptionalAction, default=None,
                       help="refuse a request no placement is predicted to serve within its SLO (counted refused), "
                       "as serve's flag; --no-admission places it as well as it can (default: "
                       f"{'on' if is_on else 'off'})")
    group = parser.add_argument_group("colocated mode")
    group.add_argument("--instances", type=count(1), default=None, metavar="N",
                       help=f"instances (default: {field_default(SimConfig, 'num_instances')})")
    group.add_argument("--tp", type=count(1), default=None, metavar="T",
                       help=f"TP degree of each instance (default: {field_default(SimConfig, 'tp')})")
    group.add_argument("--colocated-scheduler", choices=("prefill-first", "chunked"), default=None,
                       help="prefill-first: whole-prompt batches before decode steps (vLLM v0); chunked: decodes "
                       "plus prompt chunks in every iteration (Sarathi) (default: "
                       f"{field_default(SimConfig, 'colocated_scheduler')})")
    parser.add_argument("--max-batched-tokens", type=count(1), default=field_default(SimConfig, "max_batched_tokens"),
                        metavar="N", help="colocated chunked, elastic and chunked prefill batching: tokens per "
                        "iteration, decodes first (default: %(default)s)")
    parser.add_argument("--max-num-seqs", type=count(1), default=None, metavar="N",
                        help="requests an instance admits at once, as the engine's max_num_seqs (a prefill batch's "
                        "prompts too) (default: no bound but KV, DistServe's)")
    _add_load_options(parser)
    parser.set_defaults(run=_handled)


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    """The load: the options of `splitserve loadtest sweep` that shape the requests."""
    parser.add_argument("--rates", type=rates, required=True, help="comma-separated requests/s, e.g. 1,2,4,8")
    add_workload_options(parser, num_requests=1000)
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder, as loadtest sweep's (default: simulate-<date-time>)")


def add_profile_options(parser: argparse.ArgumentParser) -> None:
    """--profile, --profile-model, --kv-capacity-csv: the latency profile (simulate and plan)."""
    parser.add_argument("--profile", type=Path, required=True, metavar="FILE",
                        help="a latency profile: DistServe's JSON (max_num_tokens.csv beside it) or a splitserve "
                        "profile (docs/simulator.md)")
    parser.add_argument("--profile-model", default=None, metavar="NAME",
                        help="the model in a profile of several, e.g. facebook/opt-13b (default: its only one)")
    parser.add_argument("--kv-capacity-csv", type=Path, default=None, metavar="FILE",
                        help="DistServe profiles: the KV capacity CSV (default: max_num_tokens.csv beside --profile)")


def add_workload_options(parser: argparse.ArgumentParser, *, num_requests: int) -> None:
    """The requests at each rate and the SLOs (`simulate` and `plan`)."""
    parser.add_argument("--workload", type=parsed(parse_workload), default="chat",
                        help="chat, code, fixed:IN/OUT, prefix:SHARED/IN/OUT or file:PATH (JSONL with "
                        "prompt_tokens counts) (default: %(default)s)")
    parser.add_argument("--scale", type=positive(float), default=1.0,
                        help="chat/code: multiply the trace's lengths by this (default: %(default)g)")
    parser.add_argument("--num-requests", type=count(1), default=num_requests, metavar="N",
                        help="requests per rate; a simulation is cheap, so more than a real run's 100 "
                        "(default: %(default)s)")
    parser.add_argument("--arrival", type=parsed(parse_arrival), default="poisson",
                        help="poisson, gamma:CV, constant or trace (a file:PATH workload's arrival_s, scaled in "
                        "time to each rate) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lengths and arrival times, as the "
                        "load tester's (default: %(default)s)")
    parser.add_argument("--slo-ttft-ms", type=positive(float), default=None, metavar="MS",
                        help="time-to-first-token bound in ms (default: none)")
    parser.add_argument("--slo-tpot-ms", type=positive(float), default=None, metavar="MS",
                        help="time-per-output-token bound in ms (default: none)")
    parser.add_argument("--max-prompt-tokens", type=count(1), default=None, metavar="N",
                        help="cap on a prompt's tokens (default: none)")
    parser.add_argument("--max-output-tokens", type=count(1), default=None, metavar="N",
                        help="cap on a request's output tokens (default: none)")
    parser.add_argument("--max-context-tokens", type=count(2), default=None, metavar="N",
                        help="a model's context window, e.g. 2048 for OPT: chat/code lengths are cut so that "
                        "prompt + output fit (the output to N-1, then the prompt); fixed/prefix/file lengths "
                        "that do not fit are an error (default: none)")


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _handled(args: argparse.Namespace) -> int:
    try:
        return _simulate(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return 2


def _simulate(args: argparse.Namespace) -> int:
    from splitserve.loadtest.report import sweep_table

    config = sim_config(args)
    out = _out_dir(args.out)
    profile = load_profile(args.profile, args.profile_model, args.kv_capacity_csv)
    for tp in {config.tp} if config.mode == "colocated" else {config.prefill_tp, config.decode_tp}:
        profile.at_tp(tp)  # a missing degree fails before anything runs

    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    def run_at(rate: float) -> SimResult:
        return simulate(profile, config, requests_at(args, rate), request_slo(slo))

    sweep = simulate_sweep(args.rates, run_at, slo, _meta(args, profile, config, slo), out)
    from rich.console import Console

    Console().print(sweep_table(sweep))
    print(f"KV transfer: {sweep['meta']['simulator']['kv_transfer']}; results in {out}/")
    return 0


def requests_at(args: argparse.Namespace, rate: float) -> list[SimRequest]:
    """The requests of ``add_workload_options``' flags at ``rate``."""
    limits = LengthLimits(max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens)
    return make_requests(args.workload, args.arrival, rate, args.num_requests, seed=args.seed, scale=args.scale,
                         limits=limits, max_context_tokens=args.max_context_tokens)


def sim_config(args: argparse.Namespace) -> SimConfig:
    """The SimConfig of the flags; ValueError for flags of another mode."""
    other = {name: flag for flags in _MODE_FLAGS.values() for name, flag in flags.items()
             if name not in _MODE_FLAGS[args.mode]}
    given = [flag for name, flag in other.items() if getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --mode {args.mode}")
    values = {"num_prefill": args.prefill_instances, "prefill_tp": args.prefill_tp,
              "num_decode": args.decode_instances, "decode_tp": args.decode_tp, "num_instances": args.instances,
              "tp": args.tp, "colocated_scheduler": args.colocated_scheduler, "decode_choice": args.decode_choice,
              "prefill_batching": args.prefill_batching}
    roles = {"interval_s": args.role_interval_s, "min_dwell_s": args.role_dwell_s,
             "hysteresis": args.role_hysteresis, "enabled": None if args.fixed_roles is None else False}
    placement = PlacementConfig(**{name: value for name, value in (
        ("chunk_tokens", args.prefill_chunk_tokens), ("admission", args.admission)) if value is not None})
    return SimConfig(mode=args.mode, max_batched_tokens=args.max_batched_tokens, max_num_seqs=args.max_num_seqs,
                     placement=placement,
                     roles=RoleConfig(**{name: value for name, value in roles.items() if value is not None}),
                     **{name: value for name, value in values.items() if value is not None})


def _meta(args: argparse.Namespace, profile: LatencyProfile, config: SimConfig, slo: SLO) -> dict[str, Any]:
    """The configuration of the runs, kept in every summary (the load tester's keys, and ours)."""
    if profile.has_transfer_cost:
        transfer = (f"{profile.kv_bytes_per_token:g} bytes/token at {profile.kv_transfer_bytes_per_s:g} bytes/s "
                    "(from the profile)")
    else:
        transfer = "free (the profile gives no bandwidth: DistServe's assumption)"
    simulator = {"mode": config.mode, "cluster": config.describe(), "num_gpus": config.num_gpus,
                 "profile": profile.source, "profile_model": profile.model, "device": profile.device,
                 "kv_transfer": transfer, "max_batched_tokens": config.max_batched_tokens,
                 "max_num_seqs": config.max_num_seqs}
    if config.mode == "elastic":
        simulator["roles"] = dataclasses.asdict(config.roles)
        simulator["placement"] = dataclasses.asdict(config.placement)
    return {
        "command": shlex.join(["splitserve", *getattr(args, "argv", [])]),
        "target": f"simulated {config.describe()}, {profile.model}", "model": profile.model,
        "workload": str(args.workload), "scale": args.scale, "arrival": str(args.arrival), "seed": args.seed,
        "num_requests": args.num_requests, "slo": slo.to_dict(), "max_prompt_tokens": args.max_prompt_tokens,
        "max_output_tokens": args.max_output_tokens, "max_context_tokens": args.max_context_tokens,
        "simulator": simulator,
        "versions": {"splitserve": _version(), "python": platform.python_version()},
    }


def _version() -> str:
    try:
        return metadata.version("splitserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def _out_dir(out: Path | None) -> Path:
    out = out if out is not None else Path(f"simulate-{time.strftime('%Y%m%d-%H%M%S')}")
    for name in ("summary.json", "sweep.json"):
        if (out / name).exists():
            raise ValueError(f"{out} already holds results ({name}); choose another --out")
    return out
