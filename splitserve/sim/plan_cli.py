"""`splitserve plan`: the best layout of N GPUs for a workload and SLOs, by simulation.

It reads a latency profile, searches prefill/decode instance counts, their TP degrees and the
mode (splitserve/sim/planner.py: every layout's goodput by binary search over the rate, as
DistServe does), prints the best layouts by goodput per GPU, and the winner's `splitserve
serve` flags and Helm values. ``--out FILE`` keeps the whole search as JSON. Bad flags or
profiles end with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from splitserve.config import PLAN_MODES, PlacementConfig, PlanConfig, SimConfig, field_default
from splitserve.loadtest.arguments import count, positive, sizes
from splitserve.loadtest.metrics import SLO
from splitserve.sim.cli import add_profile_options, add_workload_options, requests_at
from splitserve.sim.planner import Planner, Search, kind
from splitserve.sim.profile_files import load_profile

_PROG = "splitserve plan"
_SCHEMA = "splitserve.plan/1"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `plan` on splitserve's command parser."""
    summary = "search the best prefill/decode layout of N GPUs for a workload and SLOs, by simulation"
    parser = commands.add_parser("plan", help=summary, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_profile_options(parser)
    parser.add_argument("--gpus", type=count(1), required=True, metavar="N", help="GPUs a layout may use (at most)")
    parser.add_argument("--modes", type=_names(PLAN_MODES), default=",".join(field_default(PlanConfig, "modes")),
                        help=f"comma-separated modes to search, of {', '.join(PLAN_MODES)} (default: %(default)s)")
    parser.add_argument("--colocated-schedulers", type=_names(("prefill-first", "chunked")),
                        default=",".join(field_default(PlanConfig, "colocated_schedulers")),
                        help="colocated mode: the schedulers to search, each a mode of its own (default: "
                        "%(default)s)")
    parser.add_argument("--max-batched-tokens", type=count(1), default=field_default(PlanConfig, "max_batched_tokens"),
                        metavar="N", help="chunked and elastic: tokens per iteration, decodes first (default: "
                        "%(default)s)")
    chunks = field_default(PlanConfig, "prefill_chunk_tokens")
    parser.add_argument("--prefill-chunk-tokens", type=sizes, default=chunks, metavar="SIZES",
                        help="elastic: the prefill chunk sizes a placement may use, as serve's flag (default: "
                        f"{','.join(map(str, chunks))})")
    is_on = field_default(PlanConfig, "admission")
    parser.add_argument("--admission", action=argparse.BooleanOptionalAction, default=is_on,
                        help="elastic: refuse a request no placement is predicted to serve within its SLO (a "
                        "refusal counts as a miss), as serve's flag; --no-admission places every request as well as "
                        f"it can (default: {'on' if is_on else 'off'})")
    add_workload_options(parser, num_requests=field_default(PlanConfig, "num_requests"))
    group = parser.add_argument_group("search")
    group.add_argument("--attainment", type=positive(float), default=field_default(PlanConfig, "attainment"),
                       metavar="SHARE", help="share of requests that must meet both SLOs (default: %(default)g)")
    group.add_argument("--min-rate", type=positive(float), default=field_default(PlanConfig, "min_rate"),
                       metavar="RPS", help="lowest rate searched; a layout failing it has goodput 0 "
                       "(default: %(default)g)")
    group.add_argument("--rate-tolerance", type=positive(float), default=field_default(PlanConfig, "rate_tolerance"),
                       metavar="FRACTION", help="stop a binary search when its bracket is this fraction of its "
                       "upper end (default: %(default)g)")
    group.add_argument("--top", type=count(1), default=field_default(PlanConfig, "top"), metavar="K",
                       help="layouts kept (exactly, despite pruning) and printed per mode (default: %(default)s)")
    group.add_argument("--out", type=Path, default=None, metavar="FILE",
                       help="write the whole search (every layout, every probe) as JSON (default: none)")
    group.add_argument("--quiet", action="store_true", help="no line per layout while searching")
    parser.set_defaults(run=_handled)


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        wrong = [n for n in names if n not in allowed]
        if not names or wrong:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(allowed)}, got {text!r}")
        return names
    return parse


def _handled(args: argparse.Namespace) -> int:
    try:
        return _plan(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return 2


def plan_config(args: argparse.Namespace) -> PlanConfig:
    if args.slo_ttft_ms is None and args.slo_tpot_ms is None:
        raise ValueError("give --slo-ttft-ms and/or --slo-tpot-ms: goodput is the rate that meets them")
    if args.attainment > 1:
        raise ValueError(f"--attainment is a share in (0, 1], got {args.attainment:g}")
    if args.rate_tolerance >= 1:
        raise ValueError(f"--rate-tolerance must be below 1, got {args.rate_tolerance:g}")
    return PlanConfig(num_gpus=args.gpus, modes=args.modes, colocated_schedulers=args.colocated_schedulers,
                      attainment=args.attainment, num_requests=args.num_requests, min_rate=args.min_rate,
                      rate_tolerance=args.rate_tolerance, top=args.top, seed=args.seed,
                      max_batched_tokens=args.max_batched_tokens, prefill_chunk_tokens=args.prefill_chunk_tokens,
                      admission=args.admission)


def _plan(args: argparse.Namespace) -> int:
    config = plan_config(args)
    if args.out is not None and args.out.exists():
        raise ValueError(f"{args.out} exists; choose another --out")
    profile = load_profile(args.profile, args.profile_model, args.kv_capacity_csv)
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    requests_at(args, 1.0)  # a bad workload fails before the search

    def progress(search: Search) -> None:
        if not args.quiet:
            found = "pruned" if search.goodput is None else f"{search.goodput:.3g} req/s"
            print(f"  {search.config.describe():44s} {found:>14s}  {len(search.probes)} runs, {search.seconds:.1f} s",
                  file=sys.stderr, flush=True)

    start = time.perf_counter()
    planner = Planner(profile, config, lambda rate: requests_at(args, rate), slo, progress)
    searches = planner.run()
    seconds = time.perf_counter() - start
    report = plan_report(args, profile.model, config, slo, searches, planner.num_simulations, seconds)
    _print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"the whole search: {args.out}")
    return 0


def plan_report(args: argparse.Namespace, model: str, config: PlanConfig, slo: SLO, searches: list[Search],
                num_simulations: int, seconds: float) -> dict[str, Any]:
    """The search as JSON: the best per mode, the winner's deployment, every layout."""
    found = [s for s in searches if s.goodput is not None]
    best: dict[str, Search] = {}
    for s in found:
        best.setdefault(kind(s.config), s)
    winner = found[0] if found and found[0].goodput else None
    return {
        "schema": _SCHEMA, "command": shlex.join(["splitserve", *getattr(args, "argv", [])]), "model": model,
        "num_gpus": config.num_gpus, "slo": slo.to_dict(), "attainment": config.attainment, "top": config.top,
        "workload": str(args.workload), "scale": args.scale, "arrival": str(args.arrival), "seed": args.seed,
        "num_requests": config.num_requests, "max_context_tokens": args.max_context_tokens,
        "num_layouts": len(searches), "num_pruned": len(searches) - len(found), "num_simulations": num_simulations,
        "seconds": round(seconds, 2),
        "best": {mode: s.to_dict() for mode, s in best.items()},
        "winner": None if winner is None else {**winner.to_dict(), **deployment(winner.config, slo)},
        "layouts": [s.to_dict() for s in searches],
    }


def deployment(config: SimConfig, slo: SLO) -> dict[str, Any]:
    """`splitserve serve` flags and Helm values (deploy/helm/splitserve/values.yaml keys) for a
    layout, with notes where splitserve cannot deploy it as simulated."""
    notes, flags, helm = [], ["splitserve", "serve", "--mode", config.mode], {"mode": config.mode}
    split = config.mode in ("disaggregated", "elastic")  # P prefill and D decode instances (elastic: to start)
    tps = {config.prefill_tp, config.decode_tp} if split else {config.tp}
    if tps != {1}:
        notes.append(f"TP {'/'.join(map(str, sorted(tps)))}: splitserve's workers use one GPU each (no tensor "
                     "parallelism yet), so this layout has no exact deployment; the counts below are instances")
    if split:
        flags += ["--prefill-workers", str(config.num_prefill), "--decode-workers", str(config.num_decode)]
    if config.mode == "elastic":
        flags += ["--max-num-batched-tokens", str(config.max_batched_tokens)]
        if config.placement.chunk_tokens != field_default(PlacementConfig, "chunk_tokens"):
            flags += ["--prefill-chunk-tokens", ",".join(map(str, config.placement.chunk_tokens))]
        if not config.placement.admission:
            flags += ["--no-admission"]
        prefill, decode = config.num_prefill, config.num_decode
    else:
        flags += ["--workers", str(config.num_instances)]
        prefill, decode = config.num_instances // 2, config.num_instances - config.num_instances // 2
        if config.mode == "colocated" and config.colocated_scheduler == "chunked":
            flags += ["--max-num-batched-tokens", str(config.max_batched_tokens)]
        elif config.mode == "colocated":
            notes.append("prefill-first: splitserve's engine always chunks prefills; it has no prefill-first "
                         "scheduler")
    for name, value in (("--slo-ttft-ms", slo.ttft_ms), ("--slo-tpot-ms", slo.tpot_ms)):
        if value is not None:
            flags += [name, f"{value:g}"]
    if config.mode == "colocated":
        notes.append("the Helm chart has no colocated mode (values.schema.json: mode is disaggregated or elastic)")
        helm_values = None
    else:
        helm_values = {**helm, "prefill": {"replicas": prefill, "workersPerPod": 1},
                       "decode": {"replicas": decode, "workersPerPod": 1}, "gpu": {"enabled": True},
                       "serve": {"sloTtftMs": slo.ttft_ms, "sloTpotMs": slo.tpot_ms}}
    return {"serve": shlex.join(flags), "helm_values": helm_values, "notes": notes}


def _print(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']} on up to {report['num_gpus']} GPUs: goodput at >= "
                  f"{report['attainment']:.0%} SLO attainment (TTFT {report['slo']['ttft_ms']} ms, "
                  f"TPOT {report['slo']['tpot_ms']} ms)")
    for column in ("layout", "GPUs", "goodput req/s", "req/s per GPU", "runs"):
        table.add_column(column, justify="left" if column == "layout" else "right")
    shown: dict[str, int] = {}
    for s in report["layouts"]:
        if s["pruned"] or shown.get(s["mode"], 0) >= report["top"]:
            continue  # beyond a mode's top, pruning may have skipped better ones
        shown[s["mode"]] = shown.get(s["mode"], 0) + 1
        table.add_row(s["layout"], str(s["num_gpus"]), f"{s['goodput']:.3g}", f"{s['goodput_per_gpu']:.3g}",
                      str(len(s["probes"])))
    console = Console(width=max(Console().width, 100))
    console.print(table)
    print(f"{report['num_layouts']} layouts ({report['num_pruned']} pruned), {report['num_simulations']} "
          f"simulations of {report['num_requests']} requests, {report['seconds']:.0f} s")
    for mode, s in report["best"].items():
        print(f"best {mode}: {s['layout']}: {s['goodput_per_gpu']:.3g} req/s per GPU")
    winner = report["winner"]
    if winner is None:
        print("no layout meets the SLOs at the lowest rate searched (--min-rate)")
        return
    print(f"\nwinner: {winner['layout']}\n  {winner['serve']}")
    if winner["helm_values"] is not None:
        print("  Helm values:\n" + "\n".join("    " + line for line in _yaml(winner["helm_values"])))
    for note in winner["notes"]:
        print(f"  note: {note}")


def _yaml(values: dict[str, Any], indent: str = "") -> list[str]:
    lines = []
    for key, value in values.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key}:", *_yaml(value, indent + "  ")]
        else:
            lines.append(f"{indent}{key}: {json.dumps(value)}")
    return lines
