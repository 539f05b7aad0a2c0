"""The simulator's speed: 64 instances x 100k requests on one core (issue 17's target: < 60 s).

DistServe's OPT-13B A100 profile, the chat workload unscaled with prompt + output capped at
OPT's 2048 tokens, Poisson arrivals at a rate near the layouts' saturation (--rate; ~2 req/s
per GPU, where `splitserve plan` puts their goodput), for disaggregated 32P+32D and colocated
64x (prefill-first and chunked), TP 1. Times the simulation alone (the requests are made
first) with time.perf_counter on this process's one thread. Writes
bench/results/sim_speed/sim_speed.json and prints a table.

    python -m bench.sim_speed [--num-requests 100000] [--rate 130]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import RESULTS_DIR, command_line, git_revision, machine_info
from splitserve.config import PlacementConfig, SimConfig
from splitserve.loadtest.arrivals import parse_arrival
from splitserve.loadtest.metrics import SLO
from splitserve.loadtest.workloads import parse_workload
from splitserve.protocol import SLO as RequestSLO
from splitserve.sim.planner import attainment
from splitserve.sim.profile_files import load_profile
from splitserve.sim.simulator import simulate
from splitserve.sim.trace import make_requests

PROFILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "distserve" / "profiler-a100-80g.distserve.json"
MODEL = "facebook/opt-13b"
LAYOUTS = {"disaggregated 32P+32D": SimConfig(num_prefill=32, num_decode=32),
           "colocated 64x prefill-first": SimConfig(mode="colocated", num_instances=64),
           "colocated 64x chunked": SimConfig(mode="colocated", num_instances=64, colocated_scheduler="chunked"),
           # elastic places every request with the router's own code against the SLO (bench.plan_opt13b's budget)
           "elastic 32P+32D": SimConfig(mode="elastic", num_prefill=32, num_decode=32, max_batched_tokens=2048,
                                        placement=PlacementConfig(chunk_tokens=(2048, 1024, 512, 256, 128)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, default=PROFILE, help="DistServe's profile (default: %(default)s)")
    parser.add_argument("--num-requests", type=int, default=100_000, help="requests per run (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=130.0, help="requests/s (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "sim_speed" / "sim_speed.json")
    args = parser.parse_args()
    profile = load_profile(args.profile, MODEL)
    requests = make_requests(parse_workload("chat"), parse_arrival("poisson"), args.rate, args.num_requests,
                             max_context_tokens=2048)
    runs = []
    for name, config in LAYOUTS.items():
        start = time.perf_counter()
        result = simulate(profile, config, requests, RequestSLO(0.25, 0.1))
        seconds = time.perf_counter() - start
        both, _ = attainment(result, SLO(250.0, 100.0))
        runs.append({"layout": name, "seconds": round(seconds, 2), "requests_per_s_simulated": round(
            args.num_requests / seconds), "attainment_250_100": round(both, 4)})
        print(f"{name}: {seconds:.1f} s", flush=True)
    report = {"command": command_line(), "revision": git_revision(Path(__file__).parent), "machine": machine_info(),
              "profile": str(args.profile.name), "model": MODEL, "workload": "chat, prompt + output <= 2048",
              "rate": args.rate, "num_requests": args.num_requests, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n| layout | requests | seconds | simulated requests/s | attainment (250/100 ms) |\n|---|---|---|---|---|")
    for run in runs:
        print(f"| {run['layout']} | {args.num_requests} | {run['seconds']} | {run['requests_per_s_simulated']} "
              f"| {run['attainment_250_100']} |")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
