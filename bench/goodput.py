"""The headline benchmark: goodput of splitserve disaggregated vs splitserve colocated vs vLLM's
CPU build, side by side in one run, on the same 2 cores, model, workload and SLOs.

Each system is a server process started from its own command line (``splitserve serve``,
``vllm serve``) and judged from outside by ``splitserve loadtest sweep`` over the same
OpenAI-compatible HTTP API, with the same seeded chat workload (Azure conversation trace
lengths scaled by --scale) and Poisson arrivals at the same rates. One server runs at a time.

SLOs come from a profile taken first on this machine (stated in the JSON and the table):
TTFT SLO = --ttft-slo-scale x the isolated prefill of the workload's median prompt on one
thread; TPOT SLO = --tpot-slo-scale x a batch-1 decode step on one thread (the tight TPOT SLO
DistServe's argument is about: a colocated batch that mixes prefills into decode steps misses it).

    .venv/bin/python -m bench.goodput            # the full run (make bench-goodput), about 30 min
    .venv/bin/python -m bench.goodput --quick    # smoke, a few minutes; results under the temp dir

--out (bench/results/goodput) gets goodput.json, goodput.png and per system the loadtest
summaries (sweep.json, rate-*/summary.json); --raw (bench/runs/goodput, not in git) gets per
system the server's log and the whole loadtest folder, requests.jsonl and plots included
(``splitserve loadtest report`` reads that folder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    RESULTS_DIR,
    ROOT,
    command_line,
    git_revision,
    keep_summaries,
    markdown_table,
    prepare_machine,
    raw_dir,
    slug,
)
from bench.profile import slo_profile as profile_slo
from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine, LoadedModel
from splitserve.engine.model_files import default_model_path
from splitserve.loadtest import workloads
from splitserve.loadtest.metrics import SLO
from splitserve.loadtest.plots import plot_compare

STARTED = time.perf_counter()
VENV_BIN = Path(sys.executable).parent
DEFAULT_VLLM = Path("/root/vllm-venv/bin/vllm")
DISAGGREGATED = "splitserve disaggregated 1P+1D"
ADMISSION = "splitserve disaggregated 1P+1D + SLO admission"
COLOCATED, COLOCATED_2 = "splitserve colocated 1x2 threads", "splitserve colocated 2x1 thread"
VLLM = "vLLM CPU"
SYSTEMS = (DISAGGREGATED, ADMISSION, COLOCATED, COLOCATED_2, VLLM)
TARGET_RATIO = 2.0  # issue: disaggregated goodput >= 2x colocated and >= 2x vLLM CPU
QUICK = {"rates": "1,3", "num_requests": 6, "duration": 10.0, "out": Path(tempfile.gettempdir()) / "goodput-quick"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.goodput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from: " + ", ".join(SYSTEMS))
    p.add_argument("--rates", default="0.1,0.25,0.5,1,1.5,2,3", help="request rates (req/s) of the sweep")
    p.add_argument("--num-requests", type=int, default=30, help="requests per rate at most")
    p.add_argument("--duration", type=float, default=100.0, help="seconds of arrivals per rate at most")
    p.add_argument("--workload", default="chat")
    p.add_argument("--scale", type=float, default=0.125, help="Azure trace lengths x this (2-core CPU)")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-output-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-slo-scale", type=float, default=5.0)
    p.add_argument("--tpot-slo-scale", type=float, default=2.0)
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="use this TTFT SLO instead of the profile's")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="use this TPOT SLO instead of the profile's")
    p.add_argument("--vllm", type=Path, default=DEFAULT_VLLM, help="the vllm command of a vLLM CPU venv "
                   "(../shared/tools/vllm-cpu-venv DIR builds one)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to come up")
    p.add_argument("--quick", action="store_true", help="two rates, a few requests; results under the temp dir")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "goodput", help="the summaries (kept in git)")
    p.add_argument("--raw", type=Path, default=None, help="server logs and per-request records (default: "
                   "--out's path under bench/runs/ for an --out under bench/results/, else <--out>-raw)")
    args = p.parse_args()
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    args.raw = args.raw or raw_dir(args.out)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    return args


def log(text: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {text}", flush=True)


# ------------------------------------------------------------------------------ SLO profile

def slo_profile(args: argparse.Namespace) -> dict:
    """Isolated timings on one thread: the prefill of the workload's median prompt and a
    batch-1 decode step (the median of five), and the SLOs derived from them."""
    import torch

    torch.set_num_threads(1)
    tokenizer = workloads.load_tokenizer(None)
    specs = generate_workload(args, tokenizer)
    median = sorted(specs, key=lambda s: s.prompt_tokens)[len(specs) // 2]
    config = EngineConfig(enable_prefix_caching=False)  # repeats of one prompt must each prefill
    engine = LLMEngine(config, loaded=LoadedModel.load(config))
    return profile_slo(engine, tokenizer.encode(median.prompt), repeats=5, ttft_scale=args.ttft_slo_scale,
                       tpot_scale=args.tpot_slo_scale, given=SLO(args.slo_ttft_ms, args.slo_tpot_ms))


def generate_workload(args: argparse.Namespace, tokenizer) -> list:
    spec = workloads.parse_workload(args.workload)
    return workloads.generate(spec, args.num_requests, tokenizer, seed=args.seed, scale=args.scale,
                              max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens)


# ---------------------------------------------------------------------------------- systems

@dataclass
class System:
    name: str
    command: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    send_slo: bool = False  # the requests carry the SLO, so the router refuses what it predicts to miss

    @property
    def target(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def systems(args: argparse.Namespace) -> list[System]:
    # Prefix caching off everywhere: every rate of the sweep sends the same seeded prompts, and
    # a cache hit would skip the prefill the workload is meant to cost.
    splitserve = [str(VENV_BIN / "splitserve"), "serve", "--grpc-port", "0", "--no-enable-prefix-caching"]
    known = {
        DISAGGREGATED: System(DISAGGREGATED, [*splitserve, "--mode", "disaggregated", "--prefill-workers", "1",
                                              "--decode-workers", "1", "--http-port", "8101"], 8101),
        ADMISSION: System(ADMISSION, [*splitserve, "--mode", "disaggregated", "--prefill-workers", "1",
                                      "--decode-workers", "1", "--http-port", "8105"], 8105, send_slo=True),
        COLOCATED: System(COLOCATED, [*splitserve, "--mode", "colocated", "--workers", "1", "--http-port", "8102"],
                          8102),
        COLOCATED_2: System(COLOCATED_2, [*splitserve, "--mode", "colocated", "--workers", "2",
                                          "--http-port", "8104"], 8104),
        # vLLM as it configures itself given the 2 cores: its CPU build runs the model on one torch
        # thread for serving (its API server process takes the other core).
        VLLM: System(VLLM, [str(args.vllm), "serve", str(hf_folder()), "--dtype", "float32", "--port", "8103",
                            "--max-model-len", "2048", "--served-model-name", default_model_path().stem,
                            "--no-enable-prefix-caching"],
                     8103, {"VLLM_CPU_KVCACHE_SPACE": "2"}),
    }
    return [known[name] for name in args.systems]


def hf_folder() -> Path:
    """The GGUF's weights as an HF folder for vLLM (written once, shared with bench.engine_throughput)."""
    from bench.hf_model import export_hf_folder  # transformers: only when vLLM is measured

    return export_hf_folder(default_model_path())


def start(system: System, log_path: Path, timeout_s: float) -> subprocess.Popen:
    log(f"starting {system.name}: {' '.join(system.command)}")
    proc = subprocess.Popen(system.command, env={**os.environ, **system.env}, stdout=log_path.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not ready(system):
        if proc.poll() is not None:
            raise RuntimeError(f"{system.name} exited with {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{system.name} not ready after {timeout_s:g} s; see {log_path}")
        time.sleep(1.0)
    warm_up(system)
    log(f"{system.name} ready")
    return proc


def ready(system: System) -> bool:
    try:
        with urllib.request.urlopen(system.target + "/models", timeout=5) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def warm_up(system: System) -> None:
    """A few requests before measuring: first-call compilation and allocation stay out of it."""
    with urllib.request.urlopen(system.target + "/models", timeout=10) as reply:
        model = json.load(reply)["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": "Warm up: " * 40, "max_tokens": 16, "temperature": 0,
                       "ignore_eos": True}).encode()
    for _ in range(3):
        request = urllib.request.Request(system.target + "/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as reply:
            reply.read()


def stop(proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(5.0)  # the server's children (Ray workers, vLLM's engine core) let go of the cores


def sweep(system: System, args: argparse.Namespace, slo: dict, out: Path) -> dict:
    """``splitserve loadtest sweep`` against the running server; its sweep.json."""
    command = [
        str(VENV_BIN / "splitserve"), "loadtest", "sweep", "--target", system.target, "--workload", args.workload,
        "--scale", str(args.scale), "--max-prompt-tokens", str(args.max_prompt_tokens),
        "--max-output-tokens", str(args.max_output_tokens), "--rates", args.rates,
        "--num-requests", str(args.num_requests), "--duration", str(args.duration), "--arrival", "poisson",
        "--seed", str(args.seed),
        "--slo-ttft-ms", f"{slo['ttft_ms']:.1f}", "--slo-tpot-ms", f"{slo['tpot_ms']:.1f}",
        "--out", str(out), "--no-progress", *(["--send-slo"] if system.send_slo else []),
    ]
    log("  " + " ".join(command))
    subprocess.run(command, check=True)
    return json.loads((out / "sweep.json").read_text())


def measure(system: System, args: argparse.Namespace, slo: dict) -> dict:
    """The system's sweep: everything under --raw, its summaries copied to --out."""
    raw = args.raw / slug(system.name)
    raw.mkdir(parents=True, exist_ok=True)
    proc = start(system, raw / "server.log", args.start_timeout)
    try:
        result = {"command": system.command, "env": system.env, "sweep": sweep(system, args, slo, raw)}
    finally:
        stop(proc)
    keep_summaries(raw, args.out / slug(system.name))
    return result


# ---------------------------------------------------------------------------------- report

def ratios(result: dict) -> list[dict]:
    """Disaggregated goodput over each baseline's, against the 2x target."""
    measured = result["systems"]
    if DISAGGREGATED not in measured:
        return []
    ours = goodput_of(measured[DISAGGREGATED])
    rows = []
    for baseline in (COLOCATED, COLOCATED_2, VLLM):  # disaggregated as a user runs it, no SLO sent
        if baseline not in measured:
            continue
        theirs = goodput_of(measured[baseline])
        ratio = ours / theirs if ours and theirs else None
        rows.append({"baseline": baseline, "goodput_disaggregated": ours, "goodput_baseline": theirs,
                     "ratio": ratio, "target": TARGET_RATIO, "met": ratio is not None and ratio >= TARGET_RATIO})
    return rows


def goodput_of(system: dict) -> float | None:
    return system["sweep"].get("goodput_rps")


def report(result: dict) -> str:
    slo = result["slo"]
    lines = [
        f"SLOs: TTFT <= {slo['ttft_ms']:.0f} ms ({slo['ttft_source']}: {1000 * slo['isolated_prefill_s']:.0f} ms "
        f"for {slo['median_prompt_tokens']} tokens), TPOT <= {slo['tpot_ms']:.0f} ms ({slo['tpot_source']}: "
        f"{1000 * slo['batch1_decode_step_s']:.1f} ms)", "",
    ]
    rates = sorted({point["rate_rps"] for s in result["systems"].values() for point in s["sweep"]["points"]})
    header = ["system", *[f"{r:g} req/s" for r in rates], "goodput (req/s)"]
    rows = []
    for name, system in result["systems"].items():
        by_rate = {point["rate_rps"]: point["attainment"] for point in system["sweep"]["points"]}
        cells = [f"{100 * by_rate[r]:.0f}%" if r in by_rate else "-" for r in rates]
        goodput = goodput_of(system)
        bound = ">= " if system["sweep"].get("goodput_is_lower_bound") else ""
        rows.append([name, *cells, "-" if goodput is None else f"{bound}{goodput:.2f}"])
    lines.append(markdown_table(header, rows))
    for row in result["targets"]:
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(f"- disaggregated / {row['baseline']} goodput: {ratio} (target >= {row['target']:g}x: "
                     f"{'MET' if row['met'] else 'NOT met'})")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    machine = prepare_machine(None)
    args.out.mkdir(parents=True, exist_ok=True)
    log("profiling the SLOs")
    slo = slo_profile(args)
    log(f"SLO: TTFT {slo['ttft_ms']:.0f} ms, TPOT {slo['tpot_ms']:.0f} ms")
    measured = {}
    for system in systems(args):
        try:
            measured[system.name] = measure(system, args, slo)
        except (RuntimeError, subprocess.CalledProcessError) as e:  # reported, the others still run
            log(f"{system.name} failed: {e}")
            measured[system.name] = {"command": system.command, "error": str(e), "sweep": {"points": []}}
    result = {
        "benchmark": "goodput", "command": command_line(), "machine": machine,
        "revision": git_revision(ROOT), "model": default_model_path().name,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "slo": slo, "systems": measured,
    }
    result["targets"] = ratios(result)
    result["wall_time_s"] = time.perf_counter() - STARTED
    (args.out / "goodput.json").write_text(json.dumps(result, indent=1))
    plot_compare({name: s["sweep"] for name, s in measured.items() if s["sweep"]["points"]}, args.out / "goodput.png")
    print(report(result))
    log(f"wrote {args.out / 'goodput.json'} and goodput.png; server logs and per-request records under {args.raw}")


if __name__ == "__main__":
    main()
