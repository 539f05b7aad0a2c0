"""`splitserve profile`: measure this engine's latency models on this machine into a profile file.

It runs the real engine in this process (no Ray, no server) over a grid of step shapes, fits
the workers' own latency models to them, measures the KV transfer bandwidth of each backend
over loopback, writes a ``splitserve.profile/1`` JSON file (docs/simulator.md) that
``splitserve simulate --profile`` reads, and prints each fit's quality. Bad flags end with a
one-line message and exit status 2, before anything is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from splitserve.config import (
    DTYPES,
    PROPOSERS,
    QUANTIZATIONS,
    TRANSFER_BACKENDS,
    EngineConfig,
    ProfileConfig,
    SpeculativeConfig,
)
from splitserve.config import field_default as default
from splitserve.loadtest.arguments import count

_PROG = "splitserve profile"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `profile` on splitserve's command parser."""
    summary = "measure this engine's latency models and KV transfer bandwidth on this machine into a profile"
    parser = commands.add_parser("profile", help=summary, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, metavar="PROFILE.json",
                        help="the profile file to write (splitserve.profile/1)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    parser.add_argument("--model", default=default(EngineConfig, "model"), metavar="PATH",
                        help="a .gguf file or an HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=DTYPES, default=default(EngineConfig, "dtype"),
                        help="the weights', activations' and KV cache's dtype (default: %(default)s)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=default(EngineConfig, "quantization"),
                        help="int8: the projections' weights as int8 per output channel, as a worker's "
                        "--quantization (default: none, weights in --dtype)")
    is_eager = default(EngineConfig, "enforce_eager")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=is_eager,
                        help="run the model eagerly; --no-enforce-eager measures the compiled forward, as a "
                        f"worker's --no-enforce-eager (default: {'eager' if is_eager else 'compiled'})")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree; this engine runs TP 1 only, so "
                        "the profile has one entry, tp 1 (default: %(default)s)")
    parser.add_argument("--threads", type=count(1), default=default(ProfileConfig, "num_threads"), metavar="N",
                        help="torch threads, as a worker's --threads-per-worker (default: torch's own)")
    budget = parser.add_argument_group("how much is measured")
    budget.add_argument("--repeats", type=count(1), default=default(ProfileConfig, "repeats"), metavar="N",
                        help="timed steps per shape, and timed transfers per backend; 1 is the quickest "
                        "(default: %(default)s)")
    budget.add_argument("--max-tokens", type=count(16), default=default(ProfileConfig, "max_tokens"), metavar="N",
                        help="the largest prefill batch and the longest decode context, in tokens "
                        "(default: %(default)s)")
    budget.add_argument("--max-batch", type=count(1), default=default(ProfileConfig, "max_batch"), metavar="N",
                        help="the largest decode batch (default: %(default)s)")
    engine = parser.add_argument_group("the engine measured (as a worker builds it)")
    kv_gib = default(EngineConfig, "kv_cache_bytes") / 2**30
    engine.add_argument("--num-kv-blocks", type=count(1), default=default(EngineConfig, "num_kv_blocks"),
                        metavar="N", help="KV cache blocks, as serve's flag; the profile's KV capacity is their "
                        f"tokens (default: as many as {kv_gib:g} GiB hold)")
    engine.add_argument("--max-num-batched-tokens", type=count(16), metavar="N",
                        default=default(EngineConfig, "max_num_batched_tokens"),
                        help="tokens per engine step (default: %(default)s)")
    engine.add_argument("--speculative", choices=PROPOSERS, default=None,
                        help="measure decode steps with 1, 2 and 4 draft tokens from this proposer too "
                        "(default: no speculation; the draft_tokens coefficient stays at its prior)")
    transfer = parser.add_argument_group("KV transfer")
    transfer.add_argument("--transfer-backends", type=_backends, metavar="LIST",
                          default=",".join(default(ProfileConfig, "transfer_backends")),
                          help="comma-separated KV transfer backends to measure over loopback, or 'none' (the "
                          "profile then has no transfer cost: free in the simulator) (default: %(default)s)")
    transfer.add_argument("--transfer-backend", choices=TRANSFER_BACKENDS,
                          default=default(ProfileConfig, "transfer_backend"),
                          help="the backend whose bandwidth the simulator uses, kv_transfer_bytes_per_s "
                          "(default: %(default)s, serve's default)")
    transfer.add_argument("--transfer-tokens", type=count(1), default=default(ProfileConfig, "transfer_tokens"),
                          metavar="N", help="each measured transfer sends the KV of a prompt this long "
                          "(default: %(default)s)")
    parser.set_defaults(run=_handled)


def _backends(text: str) -> tuple[str, ...]:
    if text.strip() == "none":
        return ()
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in TRANSFER_BACKENDS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected 'none' or a comma-separated list of "
                                         f"{', '.join(TRANSFER_BACKENDS)}, got {text!r}")
    return names


def _handled(args: argparse.Namespace) -> int:
    try:
        config = profile_config(args)
        _check_out(args.out, args.overwrite)
    except ValueError as error:
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return 2
    return _profile(args, config)


def profile_config(args: argparse.Namespace) -> ProfileConfig:
    """The ProfileConfig of the flags; ValueError for a combination that cannot be measured."""
    if args.tp != 1:
        raise ValueError(f"--tp {args.tp}: this engine runs tensor parallelism 1 only")
    if args.transfer_backends and args.transfer_backend not in args.transfer_backends:
        raise ValueError(f"--transfer-backend {args.transfer_backend} is not among --transfer-backends "
                         f"{','.join(args.transfer_backends)}")
    speculative = SpeculativeConfig(args.speculative) if args.speculative else None
    engine = EngineConfig(model=args.model, dtype=args.dtype, quantization=args.quantization,
                          enforce_eager=args.enforce_eager, num_kv_blocks=args.num_kv_blocks,
                          max_num_batched_tokens=args.max_num_batched_tokens, speculative=speculative)
    return ProfileConfig(engine=engine, repeats=args.repeats, max_tokens=args.max_tokens, max_batch=args.max_batch,
                         transfer_backends=args.transfer_backends, transfer_backend=args.transfer_backend,
                         transfer_tokens=args.transfer_tokens, num_threads=args.threads)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; choose another --out or pass --overwrite")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name a file")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist")


def _profile(args: argparse.Namespace, config: ProfileConfig) -> int:
    from splitserve.profiler.measure import measure_profile

    profile = measure_profile(config, _load(config), progress=lambda text: print(f"  {text}", file=sys.stderr))
    args.out.write_text(json.dumps(profile, indent=2) + "\n")
    _print_fits(profile)
    print(f"profile written to {args.out} ({profile['measured']['num_steps']} steps, "
          f"{profile['measured']['seconds']:.1f} s)")
    return 0


def _load(config: ProfileConfig) -> Any:
    """The model, loaded once (a seam the tests use to share their session's model)."""
    from splitserve.engine.engine import LoadedModel

    return LoadedModel.load(config.engine)


def _print_fits(profile: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from splitserve.profiler.measure import fit_rows

    table = Table(title=f"{profile['model']} on {profile['device']}: fits (seconds)")
    for column in ("model", "n", "r2", "rmse ms", "coefficients"):
        table.add_column(column)
    for row in fit_rows(profile):
        table.add_row(*row)
    console = Console()
    console.print(table)
    capacity = profile["tp"]["1"]["kv_capacity_tokens"]
    console.print(f"KV capacity {capacity} tokens", end="")
    if "kv_transfer_bytes_per_s_by_backend" in profile:
        rates = ", ".join(f"{name} {value / 1e9:.2f} GB/s"
                          for name, value in profile["kv_transfer_bytes_per_s_by_backend"].items())
        console.print(f"; {profile['kv_bytes_per_token']} KV bytes/token; transfer {rates} "
                      f"(simulator uses {profile['kv_transfer_backend']})")
    else:
        console.print("; no transfer measured")
