"""Part 2 of bench.disaggregated: disaggregated 1P+1D against two colocated setups under load.

The same seeded requests (a bench.prompts prompt with probability --short-fraction, else prose
of a length in --long-prompt-lens; an output length in --max-tokens, EOS ignored) and the same
Poisson arrival times at each rate (seeded by --seed, so a higher rate is the same schedule
compressed) go to each system through splitserve.loadtest's runner. Each system's runs are one
loadtest sweep: rate-<r>/requests.jsonl, summary.json and plots, and sweep.json, under
--raw/<system>; the summaries also go into the benchmark's JSON. The SLOs come from an isolated
profile on the in-process engine (bench.profile).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
from pathlib import Path

import numpy as np

from bench.common import command_line, markdown_table, output_agreement, slug
from bench.load import POISSON, bench_client, send_together
from bench.profile import slo_of, slo_profile
from bench.prompts import PROMPTS
from bench.servers import ENGINE, start_server, stop_server
from splitserve.config import ClusterConfig, StoreConfig
from splitserve.engine.engine import LLMEngine
from splitserve.loadtest.metrics import SLO
from splitserve.loadtest.records import RequestSpec
from splitserve.loadtest.runner import RunSetup, rate_folder, run_and_save, save_sweep
from splitserve.loadtest.texts import PromptWriter, TextTokenizer, prose_corpus

REQUEST_TIMEOUT_S = 600.0
PROFILE_REPEATS = 3


def load_systems() -> dict[str, ClusterConfig]:
    return {
        "disagg 1P+1D x1t": ClusterConfig(mode="disaggregated", num_threads=1, engine=ENGINE,
                                          store=StoreConfig(prefix="bench.load-disagg")),
        "colocated 1 x2t": ClusterConfig(mode="colocated", num_workers=1, num_threads=2, engine=ENGINE,
                                         store=StoreConfig(prefix="bench.load-colo1")),
        "colocated 2 x1t": ClusterConfig(mode="colocated", num_workers=2, num_threads=1, engine=ENGINE,
                                         store=StoreConfig(prefix="bench.load-colo2")),
    }


def load_workload(args: argparse.Namespace, tokenizer: TextTokenizer) -> list[RequestSpec]:
    """The seeded requests of every rate and system (see the module docstring)."""
    rng = random.Random(args.seed)
    writer = PromptWriter(tokenizer, prose_corpus(), np.random.default_rng(args.seed))
    specs = []
    for index in range(args.num_requests):
        if rng.random() < args.short_fraction:
            text, category = PROMPTS[rng.randrange(len(PROMPTS))], "short"
        else:
            text, category = writer.write(rng.randint(*args.long_prompt_lens)), "long"
        specs.append(RequestSpec(index, text, len(tokenizer.encode(text)), rng.randint(*args.max_tokens), category))
    return specs


def part_load(args: argparse.Namespace, engine: LLMEngine) -> dict:
    specs = load_workload(args, engine.tokenizer)
    median = sorted(specs, key=lambda s: s.prompt_tokens)[len(specs) // 2]
    given = SLO(args.ttft_slo and 1000 * args.ttft_slo, args.tpot_slo and 1000 * args.tpot_slo)
    profile = slo_profile(engine, engine.tokenizer.encode(median.prompt), repeats=PROFILE_REPEATS,
                          ttft_scale=args.ttft_slo_scale, tpot_scale=args.tpot_slo_scale, given=given)
    systems, outputs = {}, {}
    for name, config in load_systems().items():
        systems[name], outputs[name] = measure_load(name, config, specs, args, profile)
    return {
        "slo": profile, "systems": systems, "agreement": agreement(outputs),
        "workload": [{"prompt_tokens": s.prompt_tokens, "max_tokens": s.max_tokens, "category": s.category}
                     for s in specs],
    }


def measure_load(name: str, config: ClusterConfig, specs: list[RequestSpec], args: argparse.Namespace,
                 profile: dict) -> tuple[dict, dict[str, list[list[int]]]]:
    """One system's sweep over --rates; its summaries, and its output token ids per rate."""
    print(f"[load] starting {name}", file=sys.stderr)
    server = start_server(config)
    raw = args.raw / slug(name)
    meta = {"benchmark": "bench.disaggregated", "system": name, "target": f"grpc://{server.address}",
            "command": command_line(), "workload": "bench.disaggregated mixed", "arrival": str(POISSON),
            "seed": args.seed, "num_requests": len(specs), "timeout_s": REQUEST_TIMEOUT_S,
            "slo": slo_of(profile).to_dict()}
    num_workers = max(config.worker_counts().values())
    try:
        sweep, runs, outputs = asyncio.run(_sweep(server.address, specs, meta, args, raw, num_workers))
    finally:
        stop_server(server)
    for run in runs:
        a = run["attainment"]
        print(f"[load] {name} at {run['request_rate']['target']:g} req/s: attainment {a['joint']:.0%}, "
              f"failed {run['counts']['total'] - run['counts']['ok']}", file=sys.stderr)
    summaries = {f"{run['request_rate']['target']:g}": run for run in runs}
    return {"config": dataclasses.asdict(config), "sweep": sweep, "runs": summaries, "raw": str(raw)}, outputs


async def _sweep(address: str, specs: list[RequestSpec], meta: dict, args: argparse.Namespace, raw: Path,
                 num_workers: int) -> tuple[dict, list[dict], dict[str, list[list[int]]]]:
    """Warm-up, then a run per rate (scored and saved under raw), then the sweep summary."""
    async with bench_client(address) as client:
        for _ in range(2):  # every worker once (concurrent requests spread), and the transfer link
            await send_together(client, specs[:num_workers])
        client.take_outputs(0)
        slo = SLO(meta["slo"]["ttft_ms"], meta["slo"]["tpot_ms"])
        setup = RunSetup(client, specs, POISSON, slo, meta, seed=args.seed, timeout_s=REQUEST_TIMEOUT_S)
        runs, outputs = [], {}
        for rate in args.rates:
            runs.append(await run_and_save(setup, rate, raw / rate_folder(rate)))
            outputs[f"{rate:g}"] = client.take_outputs(len(specs))
    return save_sweep(raw, runs, meta), runs, outputs


def agreement(outputs: dict[str, dict[str, list[list[int]]]]) -> dict:
    """Greedy outputs of each system against the first one's, request by request, per rate
    (batching changes fp32 reduction order, so a near-tie can flip; reported, not enforced)."""
    reference, *others = outputs
    return {name: {rate: output_agreement(outputs[reference][rate], by_rate[rate]) for rate in by_rate}
            for name, by_rate in ((n, outputs[n]) for n in others)}


def load_table(result: dict) -> str:
    header = ["system", "rate req/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms", "E2E p50/p90 ms", "req/s",
              "out tok/s", "SLO attain.", "TTFT ok", "TPOT ok", "failed"]
    body = [_cells(name, rate, run) for name, system in result["systems"].items()
            for rate, run in system["runs"].items()]
    lines = [_slo_line(result["slo"]), "", markdown_table(header, body), ""]
    reference = next(iter(result["systems"]))
    for name, by_rate in result["agreement"].items():
        for rate, a in by_rate.items():
            lines.append(f"greedy outputs of {name} identical to {reference}'s at {rate} req/s: "
                         f"{a['identical_requests']}/{a['requests']}")
    for name, system in result["systems"].items():
        lines.append(f"goodput {name}: {_goodput(system['sweep'])}")
    return "\n".join(lines)


def _cells(name: str, rate: str, run: dict) -> list[str]:
    def ms(key: str, stats: tuple[str, ...]) -> str:
        values = run["latency_ms"][key]
        return "/".join("—" if values[s] is None else f"{values[s]:.0f}" for s in stats)

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{v:.0%}"

    def num(v: float | None, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    a, counts = run["attainment"], run["counts"]
    return [name, rate, ms("ttft", ("p50", "p90", "p99")), ms("tpot", ("p50", "p90", "p99")), ms("e2e", ("p50", "p90")),
            num(run["request_rate"]["completed"], ".2f"), num(run["output_tokens_per_s"], ".1f"), pct(a["joint"]),
            pct(a["ttft"]), pct(a["tpot"]), str(counts["total"] - counts["ok"])]


def _slo_line(slo: dict) -> str:
    return (f"SLO: TTFT <= {slo['ttft_ms']:.0f} ms ({slo['ttft_source']}: {slo['isolated_prefill_s'] * 1e3:.0f} ms "
            f"for the median {slo['median_prompt_tokens']}-token prompt), TPOT <= {slo['tpot_ms']:.0f} ms "
            f"({slo['tpot_source']}: {slo['batch1_decode_step_s'] * 1e3:.1f} ms)")


def _goodput(sweep: dict) -> str:
    if len(sweep["points"]) < 2:
        return "— (one rate: sweep --rates for goodput)"
    if sweep["goodput_rps"] is None:
        return f"— (below the lowest rate, {sweep['points'][0]['rate_rps']:g} req/s)"
    bound = ">= " if sweep["goodput_is_lower_bound"] else ""
    return f"{bound}{sweep['goodput_rps']:.2f} req/s"
