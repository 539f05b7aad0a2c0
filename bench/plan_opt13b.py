"""`splitserve plan` for DistServe's OPT-13B setting: the best goodput per GPU of each mode at
4, 8, 16 (and, with --gpus, 64) GPUs, with the layout chosen.

DistServe's A100-80GB profile of OPT-13B (../shared/data/distserve), its chatbot SLO (TTFT
250 ms, TPOT 100 ms, OSDI'24 Table 1), the chat workload unscaled with prompt + output capped
at OPT's 2048-token context, Poisson arrivals, 2000 requests per probed rate, seed 0. Modes:
colocated prefill-first, colocated chunked, disaggregated and elastic. The chunked and elastic
instances take up to 2048 tokens a step and elastic prefills in chunks of up to 2048 (a whole
prompt of OPT's context fits one step, as prefill-first's batches do; with the CPU defaults,
1024 and 512, every prompt over ~1700 tokens misses the 250 ms TTFT in chunks). The whole search
of each GPU count goes to bench/runs/plan/ (ignored); the summary to
bench/results/plan/opt13b.json; a table is printed.

    python -m bench.plan_opt13b [--gpus 4,8,16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import RESULTS_DIR, RUNS_DIR, command_line, git_revision, machine_info
from splitserve.cli import main as splitserve

PROFILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "distserve" / "profiler-a100-80g.distserve.json"
MODES = "disaggregated,colocated,elastic"
BUDGET = ["--max-batched-tokens", "2048", "--prefill-chunk-tokens", "2048,1024,512,256,128"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="4,8,16", help="comma-separated GPU counts (default: %(default)s)")
    parser.add_argument("--num-requests", type=int, default=2000, help="requests per probe (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "plan" / "opt13b.json")
    args = parser.parse_args()
    summaries = []
    for gpus in [int(g) for g in args.gpus.split(",")]:
        search = RUNS_DIR / "plan" / f"opt13b-{gpus}gpus.json"
        search.unlink(missing_ok=True)
        code = splitserve(["plan", "--profile", str(PROFILE), "--profile-model", "facebook/opt-13b", "--gpus",
                           str(gpus), "--modes", MODES, "--workload", "chat", "--max-context-tokens", "2048",
                           "--num-requests", str(args.num_requests), "--slo-ttft-ms", "250", "--slo-tpot-ms", "100",
                           *BUDGET, "--quiet", "--out", str(search)])
        assert code == 0, f"splitserve plan failed for {gpus} GPUs"
        report = json.loads(search.read_text())
        summaries.append({"num_gpus": gpus, "seconds": report["seconds"], "num_layouts": report["num_layouts"],
                          "num_pruned": report["num_pruned"], "num_simulations": report["num_simulations"],
                          "winner": report["winner"]["layout"] if report["winner"] else None,
                          "best": {mode: {k: s[k] for k in ("layout", "num_gpus", "goodput", "goodput_per_gpu")}
                                   for mode, s in report["best"].items()}})
    out = {"command": command_line(), "revision": git_revision(Path(__file__).parent), "machine": machine_info(),
           "profile": PROFILE.name, "model": "facebook/opt-13b", "slo": {"ttft_ms": 250, "tpot_ms": 100},
           "workload": "chat, unscaled, prompt + output <= 2048", "num_requests": args.num_requests,
           "budget": " ".join(BUDGET), "plans": summaries}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print("\n| GPUs | mode | best layout | goodput req/s | req/s per GPU | search |\n|---|---|---|---|---|---|")
    for plan in summaries:
        for mode, best in sorted(plan["best"].items()):
            print(f"| {plan['num_gpus']} | {mode} | {best['layout']} | {best['goodput']:.3g} | "
                  f"{best['goodput_per_gpu']:.3g} | {plan['num_layouts']} layouts, {plan['num_simulations']} runs, "
                  f"{plan['seconds']:.0f} s |")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
