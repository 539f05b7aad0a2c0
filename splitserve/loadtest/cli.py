"""`splitserve loadtest`: SLO load tests of splitserve (grpc://) or any OpenAI-compatible server
(http://.../v1), and re-scoring of saved results.

    run       one run at one rate (or one concurrency)       -> OUT/requests.jsonl, summary.json, *.png
    sweep     a run per rate, the goodput between them        -> OUT/rate-<r>/..., sweep.json, attainment.png
    search    the goodput by doubling the rate, then bisecting -> as sweep, with the bracketing rates
    slo-scale re-score saved results under scaled or other SLOs (no new requests)
    report    print saved results' tables and (re)write their plots

See docs/loadtest.md. Bad input ends with a one-line message and exit status 2; a server that
cannot be reached with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console

from splitserve.loadtest.arguments import count, parsed, positive, rates
from splitserve.loadtest.arrivals import Arrival, parse_arrival
from splitserve.loadtest.clients import DEFAULT_CONNECT_TIMEOUT_S, Client, TargetError, make_client
from splitserve.loadtest.metrics import SLO, meets_slo, scaled_slos
from splitserve.loadtest.records import RequestSpec
from splitserve.loadtest.report import format_rate, rescale_table, summary_table, sweep_table
from splitserve.loadtest.runner import (
    DEFAULT_DRAIN_S,
    DEFAULT_TIMEOUT_S,
    RunProgress,
    RunSetup,
    run_and_save,
    search,
    sweep,
)
from splitserve.loadtest.saved import load_results, replot, rescale
from splitserve.loadtest.workloads import generate, load_tokenizer, parse_workload, resolve_trace

_PROG = "splitserve loadtest"
LATE_WARNING_S = 0.1  # a send this far behind its schedule changes the load measured


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `loadtest` and its subcommands on splitserve's command parser."""
    loadtest = commands.add_parser("loadtest", help="SLO load tests of splitserve or any OpenAI-compatible server",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = loadtest.add_subparsers(dest="loadtest_command", required=True, title="commands", metavar="COMMAND",
                                  help="one of:")
    run = _add_command(sub, "run", "one run at one request rate (or concurrency)")
    run.add_argument("--rate", type=positive(float), default=None, help="requests/s; needed by the open-loop "
                     "arrivals (poisson, gamma, constant), refused with concurrency:N; with trace, optional: the "
                     "trace scaled in time to this mean rate (default: as recorded)")
    _add_run_options(run)
    sweep = _add_command(sub, "sweep", "a run per request rate, and the goodput")
    sweep.add_argument("--rates", type=rates, required=True, help="comma-separated requests/s, e.g. 0.5,1,2,4 "
                       "(with --arrival trace: the trace scaled in time to each mean rate)")
    _add_run_options(sweep)
    search = _add_command(sub, "search", "find the goodput: double the rate until attainment < 90%, then bisect")
    search.add_argument("--start-rate", type=positive(float), default=1.0, metavar="RATE",
                        help="the first run's requests/s (default: %(default)g)")
    search.add_argument("--steps", type=count(0), default=3, metavar="N",
                        help="bisection runs after the bracket (default: %(default)s)")
    _add_run_options(search)
    rescale = _add_command(sub, "slo-scale", "re-score saved results under scaled (or other) SLOs")
    rescale.add_argument("dir", type=Path, help="a run's or a sweep's --out folder")
    rescale.add_argument("--factors", type=rates, default=None, help="comma-separated factors to multiply the "
                         "SLO by, e.g. 0.5,1,2; the SLO is the saved one unless --slo-ttft-ms/--slo-tpot-ms "
                         "replace it (default: 1)")
    _add_slo_options(rescale)
    report = _add_command(sub, "report", "print saved results' tables and (re)write their plots")
    report.add_argument("dir", type=Path, help="a run's or a sweep's --out folder")
    for parser, handler in ((run, _run), (sweep, _sweep), (search, _search), (rescale, _slo_scale),
                            (report, _report)):
        parser.set_defaults(run=_handled(handler, f"{_PROG} {parser.prog.rsplit(' ', 1)[-1]}"))


def _add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                 summary: str) -> argparse.ArgumentParser:
    """A subcommand whose one-line summary is both its line in `loadtest --help` and its description."""
    return sub.add_parser(name, help=summary.replace("%", "%%"), description=summary[0].upper() + summary[1:] + ".")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="grpc://HOST:PORT (splitserve) or http(s)://HOST:PORT/v1")
    parser.add_argument("--model", default=None, help="model name to send (default: gRPC the served one, "
                        "HTTP the first of GET /v1/models)")
    parser.add_argument("--api-key", default=None, help="sent as a Bearer token (HTTP header, gRPC authorization "
                        "metadata) (default: none)")
    parser.add_argument("--workload", type=parsed(parse_workload), default="chat",
                        help="chat, code, fixed:IN/OUT, prefix:SHARED/IN/OUT or file:PATH (default: %(default)s)")
    parser.add_argument("--scale", type=positive(float), default=1.0, help="chat/code: multiply the trace's "
                        "prompt and output lengths by this, keeping their shape, e.g. 0.125 on a CPU "
                        "(default: %(default)g)")
    parser.add_argument("--num-requests", type=count(1), default=100, metavar="N",
                        help="requests per run (default: %(default)s)")
    parser.add_argument("--duration", type=positive(float), default=None, help="stop sending after this many "
                        "seconds, or --num-requests, whichever comes first (default: no limit)")
    parser.add_argument("--arrival", type=parsed(parse_arrival), default="poisson",
                        help="poisson, gamma:CV, constant, trace (the arrival_s of a file:PATH workload's lines) "
                        "or concurrency:N (default: %(default)s)")
    _add_slo_options(parser)
    parser.add_argument("--send-slo", action="store_true", help="also send the SLO with every request "
                        "(splitserve schedules for it; other servers do not take it)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the workload and the arrival times (default: %(default)s)")
    parser.add_argument("--timeout", type=positive(float), default=DEFAULT_TIMEOUT_S,
                        help="seconds before a request is given up as failed, and (up to 30) for "
                        "connecting at the start (default: %(default)g)")
    parser.add_argument("--drain", type=positive(float), default=DEFAULT_DRAIN_S, help="with --duration: "
                        "seconds requests still running get before they are cancelled (default: %(default)g)")
    parser.add_argument("--tokenizer", default=None, help="a GGUF file or HF folder whose tokenizer counts the "
                        "prompt tokens (default: the default model's, SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: loadtest-<date-time>)")
    parser.add_argument("--max-prompt-tokens", type=count(1), default=None, metavar="N",
                        help="cap on a prompt's tokens (default: none)")
    parser.add_argument("--max-output-tokens", type=count(1), default=None, metavar="N",
                        help="cap on a request's output tokens (default: none)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a live progress line (default: when stdout is a terminal)")


def _add_slo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slo-ttft-ms", type=positive(float), default=None, metavar="MS",
                        help="time-to-first-token bound in ms (default: none)")
    parser.add_argument("--slo-tpot-ms", type=positive(float), default=None, metavar="MS",
                        help="time-per-output-token bound in ms (default: none)")


# ------------------------------------------------------------------- argument types


def _handled(handler: Callable[[argparse.Namespace], int], prog: str) -> Callable[[argparse.Namespace], int]:
    """handler, with bad input (ValueError, a missing file) said in a sentence and status 2, a
    target that cannot be used status 1, and Ctrl-C 130."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ValueError, FileNotFoundError) as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 2
        except TargetError as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130

    return run


# ------------------------------------------------------------------------- measuring


def _run(args: argparse.Namespace) -> int:
    if args.arrival.is_open_loop and args.rate is None and args.arrival.kind != "trace":
        raise ValueError(f"--rate is required with {args.arrival} arrivals (requests/s)")
    if not args.arrival.is_open_loop and args.rate is not None:
        raise ValueError(f"--rate does not apply to {args.arrival}: a closed loop sends as its requests end")
    out = _out_dir(args.out)
    summary = _measure(args, lambda setup: run_and_save(setup, args.rate, out))
    _print(summary_table(summary))
    _warn_if_late(summary)
    print(f"results in {out}/")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    _require_open_loop(args)
    out = _out_dir(args.out)
    result = _measure(args, lambda setup: sweep(setup, args.rates, out))
    _print(sweep_table(result))
    print(f"results in {out}/")
    return 0


def _search(args: argparse.Namespace) -> int:
    _require_open_loop(args)
    out = _out_dir(args.out)
    result = _measure(args, lambda setup: search(setup, args.start_rate, out, steps=args.steps))
    _print(sweep_table(result))
    lower, upper = result["search"]["lower_rate"], result["search"]["upper_rate"]
    print(f"attainment >= 90% at {format_rate(lower)}, below at {format_rate(upper)}; results in {out}/")
    return 0


def _require_open_loop(args: argparse.Namespace) -> None:
    if not args.arrival.is_open_loop:
        raise ValueError(f"{args.loadtest_command} varies the request rate; {args.arrival} has none "
                         "(use poisson, gamma:CV or constant, or `run` for a closed loop)")


def _measure(args: argparse.Namespace, body: Callable[[RunSetup], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """body(setup) with the workload generated, the client connected and the progress shown."""
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    if args.send_slo and slo == SLO():
        raise ValueError("--send-slo needs --slo-ttft-ms or --slo-tpot-ms")
    sent = slo if args.send_slo else SLO()
    client = make_client(args.target, model=args.model, api_key=args.api_key,
                         timeout_s=min(args.timeout, DEFAULT_CONNECT_TIMEOUT_S),
                         slo_ttft_ms=sent.ttft_ms, slo_tpot_ms=sent.tpot_ms)
    arrival, num_requests = resolve_trace(args.arrival, args.workload, args.num_requests)
    specs = generate(args.workload, num_requests, load_tokenizer(args.tokenizer), seed=args.seed,
                     scale=args.scale, max_prompt_tokens=args.max_prompt_tokens,
                     max_output_tokens=args.max_output_tokens)
    return asyncio.run(_connected(args, client, specs, arrival, slo, body))


async def _connected(args: argparse.Namespace, client: Client, specs: list[RequestSpec], arrival: Arrival, slo: SLO,
                     body: Callable[[RunSetup], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    async with client:
        is_shown = sys.stdout.isatty() if args.progress is None else args.progress
        progress = RunProgress(lambda record: meets_slo(record, slo)) if is_shown else None
        setup = RunSetup(client, specs, arrival, slo, _meta(args, client.model, slo), seed=args.seed,
                         duration_s=args.duration, timeout_s=args.timeout, drain_s=args.drain, progress=progress)
        with progress or contextlib.nullcontext():
            return await body(setup)


def _meta(args: argparse.Namespace, model: str | None, slo: SLO) -> dict[str, Any]:
    """The configuration of the runs, kept in every summary."""
    return {
        "command": shlex.join(["splitserve", *args.argv]), "target": args.target, "model": model,
        "workload": str(args.workload), "scale": args.scale, "arrival": str(args.arrival), "seed": args.seed,
        "num_requests": args.num_requests, "duration_s": args.duration, "timeout_s": args.timeout,
        "slo": slo.to_dict(), "slo_sent": args.send_slo, "tokenizer": args.tokenizer or "default",
        "max_prompt_tokens": args.max_prompt_tokens, "max_output_tokens": args.max_output_tokens,
        "versions": {name: metadata.version(name) for name in ("splitserve", "grpcio", "aiohttp")}
        | {"python": platform.python_version()},
    }


def _out_dir(out: Path | None) -> Path:
    out = out if out is not None else Path(f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}")
    for name in ("summary.json", "sweep.json"):
        if (out / name).exists():
            raise ValueError(f"{out} already holds results ({name}); choose another --out")
    return out


def _warn_if_late(summary: dict[str, Any]) -> None:
    lag_s = summary["meta"].get("max_send_lag_s", 0.0)
    if lag_s > LATE_WARNING_S:
        print(f"warning: the client sent requests up to {lag_s:.2f} s behind schedule, so the offered load "
              "was below the rate asked (this machine is too busy)", file=sys.stderr)


# ---------------------------------------------------------------------- saved results


def _slo_scale(args: argparse.Namespace) -> int:
    if args.factors is None and args.slo_ttft_ms is None and args.slo_tpot_ms is None:
        raise ValueError("give --factors, or --slo-ttft-ms/--slo-tpot-ms")
    results = load_results(args.dir)
    base = SLO(args.slo_ttft_ms or results.slo.ttft_ms, args.slo_tpot_ms or results.slo.tpot_ms)
    factors = args.factors or [1.0]
    rows = rescale(results, dict(zip(factors, scaled_slos(base, factors), strict=True)))
    _print(rescale_table(rows))
    plot = f", {args.dir / 'slo-scale.png'}" if results.sweep is not None else ""
    print(f"written: {args.dir / 'slo-scale.json'}{plot}")
    return 0


def _report(args: argparse.Namespace) -> int:
    results = load_results(args.dir)
    _print(sweep_table(results.sweep) if results.sweep is not None else summary_table(results.runs[0].summary))
    print("written: " + ", ".join(str(path) for path in replot(results)))
    return 0


def _print(table: Any) -> None:
    Console().print(table)
