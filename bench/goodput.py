"""The headline benchmark: goodput of splitserve elastic (the default serve) against splitserve
disaggregated 1P+1D, splitserve colocated 2x1 thread and vLLM's CPU build, side by side in one
run, on the same 2 cores, model, workloads and SLOs.

Each system is a server process started from its own command line (``splitserve serve``,
``vllm serve``) and judged from outside by ``splitserve loadtest sweep`` over the same
OpenAI-compatible HTTP API, with the same seeded requests at the same rates. One server runs at a
time. Workloads (bench/goodput_plan.py): ``chat-x0.125`` (Azure conversation lengths x 0.125,
Poisson arrivals), ``chat-x0.5`` (x 0.5: prompts ~4x longer) and ``chat-x0.125-bursty`` (x 0.125,
gamma arrivals with CV 3). ``--rounds`` rounds (default 3): in round i every system, in the order
rotated by i, is started once and swept over every workload (round i's seed is --seed + i, so each
round sends new prompts and arrival times, the same to every system); the scores pool the rounds
and carry paired bootstrap 95% intervals (bench/goodput_scores.py; report: bench/goodput_report.py).

SLOs per workload come from a profile taken first on this machine (stated in the JSON and the
table): TTFT SLO = --ttft-slo-scale x the isolated prefill of the workload's median prompt on one
thread; TPOT SLO = --tpot-slo-scale x a batch-1 decode step on one thread.

    .venv/bin/python -m bench.goodput            # the full run (make bench-goodput): about 2 h 45 min
    .venv/bin/python -m bench.goodput --quick    # smoke, ~10 min (2 rates x 6 requests, 1 round); temp dir
    .venv/bin/python -m bench.goodput --report bench/results/goodput/goodput.json   # re-score, no servers

Duration: per round and system a server start (~1 min) and per workload a sweep, each rate
costing min((num_requests - 1) / rate, --duration) s of sends plus ~10 s of tail. With the
defaults (24 requests, 60 s, the rates in bench/goodput_plan.py) a sweep takes ~3 min on
chat-x0.125, ~5.3 min on chat-x0.5 and ~4.3 min on bursty, so 4 systems x 3 rounds x (1 + 12.6)
min plus the profiles is ~2 h 45 min (printed at the start for the flags given; overloaded rates
drain longer, so allow 3 h).

--out (bench/results/goodput) gets goodput.json, goodput.png and per workload, round and system
the loadtest summaries (<workload>/round-<i>/<system>/sweep.json, rate-*/summary.json); --raw
(bench/runs/goodput, not in git) gets the same folders with the whole loadtest output,
requests.jsonl and plots included (``splitserve loadtest report`` reads them), and the servers'
logs under servers/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    RESULTS_DIR,
    ROOT,
    command_line,
    git_revision,
    keep_summaries,
    prepare_machine,
    raw_dir,
    slug,
)
from bench.goodput_plan import (
    ADMISSION,
    COLOCATED,
    COLOCATED_2,
    DEFAULT_SYSTEMS,
    DISAGGREGATED,
    ELASTIC,
    SYSTEMS,
    VLLM,
    VLLM_MAX_MODEL_LEN,
    WORKLOADS,
    WorkloadPlan,
    estimate_seconds,
    format_duration,
    parse_rates,
    plan_workloads,
    rotated,
)
from bench.goodput_report import publish
from bench.goodput_scores import request_rows, sent_rows
from bench.goodput_servers import System, start, stop

STARTED = time.perf_counter()
VENV_BIN = Path(sys.executable).parent
DEFAULT_VLLM = Path("/root/vllm-venv/bin/vllm")
QUICK = {"num_requests": 6, "duration": 10.0, "rounds": 1, "out": Path(tempfile.gettempdir()) / "goodput-quick"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.goodput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help="comma-separated, from: " + ", ".join(SYSTEMS))
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, from: " + ", ".join(WORKLOADS))
    p.add_argument("--rates", action="append", default=[], metavar="[WORKLOAD=]R1,R2,...",
                   help="request rates (req/s) of the sweeps: for every workload, or WORKLOAD=... for one "
                   "(repeatable); default: per workload, see bench/goodput_plan.py")
    p.add_argument("--rounds", type=int, default=3, help="sweeps of every system and workload (order rotated)")
    p.add_argument("--num-requests", type=int, default=24, help="requests per rate at most")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate at most")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="cap on prompts (default: per workload, "
                   f"1024 or 1536; prompt + output must fit vLLM's {VLLM_MAX_MODEL_LEN})")
    p.add_argument("--max-output-tokens", type=int, default=None, help="cap on outputs (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="round i sends the workload and arrivals of seed + i")
    p.add_argument("--ttft-slo-scale", type=float, default=5.0)
    p.add_argument("--tpot-slo-scale", type=float, default=2.0)
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="this TTFT SLO on every workload instead")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="this TPOT SLO on every workload instead")
    p.add_argument("--vllm", type=Path, default=DEFAULT_VLLM, help="the vllm command of a vLLM CPU venv "
                   "(../shared/tools/vllm-cpu-venv DIR builds one)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to come up")
    p.add_argument("--quick", action="store_true", help="two rates, a few requests, one round; results under the "
                   "temp dir (flags given explicitly still win)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "goodput", help="the summaries (kept in git)")
    p.add_argument("--raw", type=Path, default=None, help="server logs and per-request records (default: "
                   "--out's path under bench/runs/ for an --out under bench/results/, else <--out>-raw)")
    p.add_argument("--report", type=Path, metavar="JSON", help="run nothing: re-score a saved goodput.json, "
                   "rewrite it and its plot, print the tables")
    if "--quick" in sys.argv[1:]:
        p.set_defaults(**QUICK)
    args = p.parse_args()
    args.raw = args.raw or raw_dir(args.out)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or set(args.systems) - set(SYSTEMS):
        p.error(f"--systems takes names from: {', '.join(SYSTEMS)}")
    names = [w.strip() for w in dict.fromkeys(args.workloads.split(",")) if w.strip()]
    try:
        args.plans = plan_workloads(names, parse_rates(args.rates, names), max_prompt_tokens=args.max_prompt_tokens,
                                    max_output_tokens=args.max_output_tokens, quick=args.quick)
    except ValueError as e:
        p.error(str(e))
    if args.rounds < 1 or args.num_requests < 2 or args.duration <= 0:
        p.error("need --rounds >= 1, --num-requests >= 2 and --duration > 0")
    return args


def log(text: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {text}", flush=True)


# ------------------------------------------------------------------------------ SLO profile

def slo_profiles(args: argparse.Namespace) -> dict[str, dict]:
    """Per workload: isolated timings on one thread (the prefill of the workload's median prompt
    and a batch-1 decode step, medians of five) and the SLOs derived from them."""
    import torch

    from bench.profile import slo_profile
    from splitserve.config import EngineConfig
    from splitserve.engine.engine import LLMEngine, LoadedModel
    from splitserve.loadtest import workloads
    from splitserve.loadtest.metrics import SLO

    torch.set_num_threads(1)
    tokenizer = workloads.load_tokenizer(None)
    config = EngineConfig(enable_prefix_caching=False)  # repeats of one prompt must each prefill
    engine = LLMEngine(config, loaded=LoadedModel.load(config))
    profiles = {}
    for plan in args.plans:
        specs = workloads.generate(workloads.parse_workload(plan.workload), args.num_requests, tokenizer,
                                   seed=args.seed, scale=plan.scale, max_prompt_tokens=plan.max_prompt_tokens,
                                   max_output_tokens=plan.max_output_tokens)
        median = sorted(specs, key=lambda s: s.prompt_tokens)[len(specs) // 2]
        profiles[plan.name] = slo_profile(engine, tokenizer.encode(median.prompt), repeats=5,
                                          ttft_scale=args.ttft_slo_scale, tpot_scale=args.tpot_slo_scale,
                                          given=SLO(args.slo_ttft_ms, args.slo_tpot_ms))
        log(f"{plan.name} SLO: TTFT {profiles[plan.name]['ttft_ms']:.0f} ms, TPOT {profiles[plan.name]['tpot_ms']:.0f} "
            f"ms (median prompt {len(tokenizer.encode(median.prompt))} tokens)")
    return profiles


# ---------------------------------------------------------------------------------- systems

def systems(args: argparse.Namespace, tpot_slo_ms: float) -> list[System]:
    """The servers; ``tpot_slo_ms``: the TPOT target elastic is deployed with. Elastic's requests
    also carry their workload's SLO (``send_slo``): its placement weighs each prefill's
    predicted TTFT against it and keeps a local prefill from pushing running requests past
    their TPOT; with --no-admission it refuses nothing, like every other server here (their
    requests carry no SLO: the SLO-aware placement is what elastic is measured for)."""
    # Prefix caching off everywhere: every rate of the sweep sends the same seeded prompts, and
    # a cache hit would skip the prefill the workload is meant to cost.
    def splitserve(port: int, mode: str, *workers: str, threads: int = 1) -> list[str]:
        return [str(VENV_BIN / "splitserve"), "serve", "--grpc-port", "0", "--no-enable-prefix-caching", "--mode",
                mode, *workers, "--threads-per-worker", str(threads), "--http-port", str(port)]

    one_one = ("--prefill-workers", "1", "--decode-workers", "1")
    known = {
        ELASTIC: System(ELASTIC, splitserve(8106, "elastic", "--workers", "2", "--slo-tpot-ms", f"{tpot_slo_ms:g}",
                                             "--no-admission"), 8106, send_slo=True),
        DISAGGREGATED: System(DISAGGREGATED, splitserve(8101, "disaggregated", *one_one), 8101),
        ADMISSION: System(ADMISSION, splitserve(8105, "disaggregated", *one_one), 8105, send_slo=True),
        COLOCATED: System(COLOCATED, splitserve(8102, "colocated", "--workers", "1", threads=2), 8102),
        COLOCATED_2: System(COLOCATED_2, splitserve(8104, "colocated", "--workers", "2"), 8104),
        # vLLM as it configures itself given the 2 cores: its CPU build runs the model on one torch
        # thread for serving (its API server process takes the other core).
        VLLM: System(VLLM, [str(args.vllm), "serve", str(hf_folder()) if VLLM in args.systems else "<HF folder>",
                            "--dtype", "float32", "--port", "8103", "--max-model-len", str(VLLM_MAX_MODEL_LEN),
                            "--served-model-name", model_path().stem, "--no-enable-prefix-caching"],
                     8103, {"VLLM_CPU_KVCACHE_SPACE": "2"}),
    }
    return [known[name] for name in args.systems]


def model_path() -> Path:
    from splitserve.engine.model_files import default_model_path

    return default_model_path()


def hf_folder() -> Path:
    """The GGUF's weights as an HF folder for vLLM (written once, shared with bench.engine_throughput;
    imports transformers, so only when vLLM is measured)."""
    from bench.hf_model import export_hf_folder

    return export_hf_folder(model_path())


# -------------------------------------------------------------------------------- measuring

def sweep(system: System, plan: WorkloadPlan, seed: int, args: argparse.Namespace, slo: dict, out: Path) -> dict:
    """``splitserve loadtest sweep`` of one workload against the running server: its sweep.json,
    each rate's requests as rows (bench.goodput_scores.request_rows) and what was sent
    (``sent_rows``: bench.sim_validation replays it)."""
    from splitserve.loadtest.saved import load_results

    command = [
        str(VENV_BIN / "splitserve"), "loadtest", "sweep", "--target", system.target, "--workload", plan.workload,
        "--scale", f"{plan.scale:g}", "--max-prompt-tokens", str(plan.max_prompt_tokens),
        "--max-output-tokens", str(plan.max_output_tokens), "--rates", plan.rates_arg,
        "--num-requests", str(args.num_requests), "--duration", f"{args.duration:g}", "--arrival", plan.arrival,
        "--seed", str(seed), "--slo-ttft-ms", f"{slo['ttft_ms']:.1f}", "--slo-tpot-ms", f"{slo['tpot_ms']:.1f}",
        "--out", str(out), "--no-progress", *(["--send-slo"] if system.send_slo else []),
    ]
    log("  " + " ".join(command))
    subprocess.run(command, check=True)
    saved = load_results(out)
    assert saved.sweep is not None, "loadtest sweep writes sweep.json"
    rates = [f"{run.summary['request_rate']['target']:g}" for run in saved.runs]
    return {"sweep": saved.sweep, "requests": {rate: request_rows(run.records) for rate, run in zip(rates, saved.runs)},
            "sent": {rate: sent_rows(run.records) for rate, run in zip(rates, saved.runs)}}


def measure(system: System, round_index: int, args: argparse.Namespace, slos: dict[str, dict]) -> dict[str, dict]:
    """One round of one system: a server start, then every workload's sweep. Per workload its
    entry ({"sweep", "requests"} or {"error"}); summaries copied from --raw to --out."""
    where = f"round-{round_index + 1}/{slug(system.name)}"
    try:
        proc = start(system, args.raw / "servers" / f"round-{round_index + 1}-{slug(system.name)}.log",
                     args.start_timeout, log)
    except RuntimeError as e:  # reported, the others still run
        log(f"{system.name} failed to start: {e}")
        return {plan.name: {"error": str(e)} for plan in args.plans}
    entries = {}
    try:
        for plan in args.plans:
            raw, kept = args.raw / plan.name / where, args.out / plan.name / where
            for folder in (raw, kept):  # an earlier run's rate-* folders must not join this sweep
                shutil.rmtree(folder, ignore_errors=True)
            if proc.poll() is not None:
                entries[plan.name] = {"error": f"the server exited with {proc.returncode} before this sweep"}
                continue
            try:
                entries[plan.name] = sweep(system, plan, args.seed + round_index, args, slos[plan.name], raw)
                keep_summaries(raw, kept)
                log(f"{plan.name} {system.name}: goodput {entries[plan.name]['sweep']['goodput_rps']}")
            except (subprocess.CalledProcessError, ValueError) as e:
                log(f"{plan.name} {system.name} failed: {e}")
                entries[plan.name] = {"error": str(e)}
    finally:
        stop(proc)
    return entries


def run_rounds(args: argparse.Namespace, listed: list[System], result: dict) -> None:
    """Every round: each system in the rotated order; the result saved (and scored) after each round."""
    by_name = {s.name: s for s in listed}
    slos = {name: w["slo"] for name, w in result["workloads"].items()}
    for i in range(args.rounds):
        order = rotated(args.systems, i)
        log(f"round {i + 1}/{args.rounds}: {', '.join(order)}")
        result["rounds"].append({"round": i + 1, "seed": args.seed + i, "order": order})
        for plan in args.plans:
            result["workloads"][plan.name]["rounds"].append(
                {"round": i + 1, "seed": args.seed + i, "order": order, "systems": {}})
        for name in order:
            for workload, entry in measure(by_name[name], i, args, slos).items():
                result["workloads"][workload]["rounds"][-1]["systems"][name] = entry
        result["wall_time_s"] = time.perf_counter() - STARTED
        publish(result, args.out / "goodput.json", quiet=i + 1 < args.rounds)


def main() -> None:
    args = parse_args()
    if args.report:
        publish(json.loads(args.report.read_text()), args.report)
        return
    estimate = estimate_seconds(args.plans, len(args.systems), args.rounds, args.num_requests, args.duration)
    log(f"{len(args.systems)} systems x {len(args.plans)} workloads x {args.rounds} rounds: about "
        f"{format_duration(estimate)}")
    machine = prepare_machine(None)
    args.out.mkdir(parents=True, exist_ok=True)
    log("profiling the SLOs")
    profiles = slo_profiles(args)
    listed = systems(args, tpot_slo_ms=min(p["tpot_ms"] for p in profiles.values()))
    result = {
        "benchmark": "goodput", "command": command_line(), "machine": machine, "revision": git_revision(ROOT),
        "model": model_path().name,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "plans"},
        "estimate_s": estimate,
        "systems": {s.name: {"command": s.command, "env": s.env, "send_slo": s.send_slo} for s in listed},
        "rounds": [],
        "workloads": {p.name: {"plan": dataclasses.asdict(p), "slo": profiles[p.name], "rounds": []}
                      for p in args.plans},
    }
    run_rounds(args, listed, result)
    log(f"wrote {args.out / 'goodput.json'} and goodput.png ({result['wall_time_s'] / 60:.1f} min); server logs "
        f"and per-request records under {args.raw}")


if __name__ == "__main__":
    main()
