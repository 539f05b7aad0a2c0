"""Disaggregated serving against colocated serving, side by side in one run, over the real workers.

Part 1, handoff cost (bench/disagg_handoff.py): for each prompt length, the time to the first
token of one request at a time, (a) on an in-process ``LLMEngine`` (1 thread, no gRPC: the
local prefill), (b) over gRPC to a colocated worker (1 thread) and (c) over gRPC to a
disaggregated pair (1 prefill + 1 decode worker, 1 thread each) for each KV transfer backend
and layers-per-chunk. (c) / (b) is the handoff overhead.

Part 2, load (bench/disagg_load.py): seeded Poisson arrivals of mixed-length requests against
disaggregated 1P+1D (1 thread each), colocated 1 worker x 2 threads and colocated 2 workers x
1 thread (2 cores in each), sent and scored by splitserve.loadtest (one sweep per system):
TTFT, TPOT, E2E, SLO attainment, throughput and goodput as splitserve/loadtest/metrics.py
defines them.

One Ray for the run (2 CPUs); one Server per system, stopped before the next starts. Prompts
are text (bench.prompts, and prose cut to exact token counts by splitserve.loadtest.texts).

    .venv/bin/python -m bench.disaggregated             # the full run (make bench-disagg)
    .venv/bin/python -m bench.disaggregated --quick     # smoke, a few minutes; output to the temp dir
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import ray
import torch

from bench.common import RESULTS_DIR, ROOT, command_line, git_revision, prepare_machine, raw_dir
from bench.disagg_handoff import Prompt, handoff_rows, handoff_systems, handoff_table, measure_handoff
from bench.disagg_load import load_table, part_load
from bench.profile import local_prefill
from bench.servers import ENGINE
from splitserve.cluster import RAY_NAMESPACE
from splitserve.engine.engine import LLMEngine, LoadedModel
from splitserve.engine.model_files import default_model_path
from splitserve.loadtest.texts import PromptWriter, prose_corpus

QUICK = {"prompt_lens": [64, 256], "repeats": 2, "layers_per_chunk": [1], "num_requests": 6, "rates": [2.0],
         "long_prompt_lens": [100, 200], "max_tokens": [8, 16],
         "out": Path(tempfile.gettempdir()) / "disaggregated-quick.json"}  # never over the real results


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.disaggregated", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration: other defaults become QUICK's")
    p.add_argument("--only", choices=("handoff", "load"), default=None, help="run one part only")
    p.add_argument("--prompt-lens", type=ints, default=[128, 512, 1024], help="part 1 prompt lengths (tokens)")
    p.add_argument("--repeats", type=int, default=5, help="part 1 timed repeats; tables show the median")
    p.add_argument("--backends", default="collective,grpc", help="part 1 KV transfer backends")
    p.add_argument("--layers-per-chunk", type=ints, default=[1, 6], help="part 1 layer groups on the wire")
    p.add_argument("--rates", type=floats, default=[1.0], help="part 2 request rates (req/s); several: goodput")
    p.add_argument("--num-requests", type=int, default=40, help="part 2 requests per rate")
    p.add_argument("--long-prompt-lens", type=ints, default=[200, 800], help="part 2 prose prompt range (tokens)")
    p.add_argument("--short-fraction", type=float, default=0.5, help="part 2 share of bench.prompts.PROMPTS")
    p.add_argument("--max-tokens", type=ints, default=[32, 64], help="part 2 output length range (EOS ignored)")
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds (default: --ttft-slo-scale x profile)")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds (default: --tpot-slo-scale x profile)")
    p.add_argument("--ttft-slo-scale", type=float, default=5.0, help="x isolated prefill of the median prompt")
    p.add_argument("--tpot-slo-scale", type=float, default=2.0, help="x isolated batch-1 decode step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "disaggregated.json", help="the summary JSON")
    p.add_argument("--raw", type=Path, default=None, help="part 2's loadtest folders, per system: requests.jsonl, "
                   "summaries, plots (default: bench/runs/disaggregated for the default --out, else <--out>-raw)")
    if "--quick" in sys.argv[1:]:
        p.set_defaults(**QUICK)  # flags given explicitly still win
    args = p.parse_args()
    args.backends = args.backends.split(",")
    args.raw = args.raw or raw_dir(args.out)
    if args.repeats < 1 or args.num_requests < 2 or min(args.rates) <= 0 or min(args.prompt_lens) < 1:
        p.error("need repeats >= 1, num-requests >= 2, rates > 0 and prompt lengths >= 1")
    if len(args.long_prompt_lens) != 2 or len(args.max_tokens) != 2 or not 0 <= args.short_fraction <= 1:
        p.error("--long-prompt-lens and --max-tokens take LOW,HIGH; --short-fraction is in [0, 1]")
    return args


def part_handoff(args: argparse.Namespace, engine: LLMEngine) -> dict:
    writer = PromptWriter(engine.tokenizer, prose_corpus(), np.random.default_rng(args.seed))
    texts = {n: writer.write(n) for n in args.prompt_lens}
    prompts = {n: Prompt(text, engine.tokenizer.encode(text)) for n, text in texts.items()}
    for prompt in prompts.values():
        local_prefill(engine, prompt.ids)  # warm-up
    systems = {name: measure_handoff(name, config, engine, prompts, args.repeats)
               for name, config in handoff_systems(args.backends, args.layers_per_chunk).items()}
    return {"systems": systems, "summary": handoff_rows(systems)}


def main() -> None:
    args = parse_args()
    machine = prepare_machine(1)  # the in-process engine: 1 thread, like each 1-thread worker
    engine = LLMEngine(ENGINE, loaded=LoadedModel.load(ENGINE))
    result: dict = {
        "benchmark": "disaggregated", "command": command_line(),
        "machine": {**machine, "torch": torch.__version__, "ray": ray.__version__,
                    "revision": git_revision(ROOT), "model": default_model_path().name},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    ray.init(num_cpus=2, include_dashboard=False, namespace=RAY_NAMESPACE)
    try:
        if args.only != "load":
            result["handoff"] = part_handoff(args, engine)
        if args.only != "handoff":
            result["load"] = part_load(args, engine)
    finally:
        ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_report(result, args)


def print_report(result: dict, args: argparse.Namespace) -> None:
    m = result["machine"]
    print(f"date {m['date']}, nproc {m['nproc']}, torch {m['torch']}, ray {m['ray']}, load average at start "
          f"{m['load_average_at_start'][0]:.2f}, revision {m['revision']}")
    if "handoff" in result:
        print(f"\nHandoff cost (median of {args.repeats}; 1 thread per worker; TTFT over gRPC, one request "
              "at a time)\n")
        print(handoff_table(result["handoff"]["summary"]))
    if "load" in result:
        print(f"\nLoad: {args.num_requests} Poisson requests per rate (seed {args.seed}), 2 cores per system\n")
        print(load_table(result["load"]))
    raw = f"; part 2's request records under {args.raw}" if "load" in result else ""
    print(f"wrote {args.out}{raw}", file=sys.stderr)


if __name__ == "__main__":
    main()
