"""Speculation policy through the real cluster: fixed k in {0, 2, 4} against the router's adaptive k.

One Server per workload (disaggregated, 1 prefill + 1 decode worker, 1 thread each; n-gram
speculation on the decode worker, k up to 8; prefix caching off). The policy is per request: a
pinned k (``num_speculative_tokens=k``) or adaptive (unset: the router chooses each request's k
from acceptance and the decode step model). At each rate (low, medium, high) every policy runs
the same seeded Poisson arrivals and prompts against the same server, one run after another, in
``--rounds`` rounds (new arrivals each round; the policy order rotated, so each policy runs in every
position and the host's slow drift lands on all of them); a policy's numbers pool its rounds.
Requests are sent by splitserve.loadtest's runner and scored by its metrics.py (TTFT, TPOT,
E2E, attainment, goodput); the report and targets are in bench/speculation_policy_report.py.

Workloads (bench/prompts.py): ``lookup`` (the extractive prompts: repeat or summarize a passage
given in the prompt, so n-gram drafts are accepted) and ``chat`` (open questions through the chat
template, and the plain-text PROMPTS); 64 tokens each, greedy, EOS ignored.

    .venv/bin/python -m bench.speculation_policy            # the full run, 35-50 min (make bench-spec-policy)
    .venv/bin/python -m bench.speculation_policy --quick    # smoke, ~3 min; output to the temp dir
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

from bench.common import RESULTS_DIR, ROOT, command_line, git_revision, output_agreement, prepare_machine, raw_dir
from bench.load import POISSON, bench_client, goodput_note, send_alone, send_together
from bench.prompts import CHAT_QUESTIONS, EXTRACTIVE, PROMPTS
from bench.servers import ENGINE, start_server, stop_server
from bench.speculation_policy_report import ADAPTIVE, RATE_NAMES, publish
from bench.speculation_policy_scores import Run, pool, run_entry
from splitserve.cluster import RAY_NAMESPACE
from splitserve.config import ClusterConfig, SpeculativeConfig, StoreConfig
from splitserve.engine.model_files import default_model_path, load_tokenizer
from splitserve.engine.tokenizer import Tokenizer
from splitserve.loadtest.clients import GrpcClient
from splitserve.loadtest.metrics import SLO
from splitserve.loadtest.records import RequestSpec, write_jsonl
from splitserve.loadtest.runner import run
from splitserve.server import Server

STARTED = time.perf_counter()
WORKLOADS = ("lookup", "chat")
K_DEFAULT, K_MAX = 3, 8  # the decode worker's k for unpinned requests until the router changes it; the cap
REQUEST_TIMEOUT_S = 600.0
DECODE_ENGINE = dataclasses.replace(ENGINE, speculative=SpeculativeConfig(
    "ngram", num_speculative_tokens=K_DEFAULT, max_speculative_tokens=K_MAX))
QUICK = {"duration": 3.0, "min_requests": 2, "profile_requests": 2, "max_tokens": 32, "rounds": 1,
         "out": Path(tempfile.gettempdir()) / "speculation_policy-quick.json"}  # never over the real results


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.speculation_policy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke sizes: other defaults become QUICK's")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"from {', '.join(WORKLOADS)}")
    p.add_argument("--ks", default="0,2,4", help="fixed k policies (k=0 is the reference; adaptive always runs)")
    for name, default in zip(RATE_NAMES, ("0.5x", "2.5x", "6x")):
        p.add_argument(f"--{name}", default=default,
                       help=f"{name} rate: req/s, or F'x' = F / the isolated k=0 latency of the workload")
    p.add_argument("--duration", type=float, default=14.0, help="seconds of arrivals per run (x rate = requests)")
    p.add_argument("--min-requests", type=int, default=8, help="requests per run at least")
    p.add_argument("--rounds", type=int, default=3,
                   help="runs of every policy per rate (new arrivals each round, policy order rotated)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (EOS ignored)")
    p.add_argument("--profile-requests", type=int, default=4, help="isolated k=0 requests for the profile")
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds (default: --ttft-slo-scale x profile)")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds (default: --tpot-slo-scale x profile)")
    p.add_argument("--ttft-slo-scale", type=float, default=5.0, help="x isolated TTFT (k=0)")
    p.add_argument("--tpot-slo-scale", type=float, default=2.0, help="x isolated TPOT (k=0, batch 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "speculation_policy.json")
    p.add_argument("--raw", type=Path, default=None, help="every run's request records, JSONL (default: "
                   "bench/runs/speculation_policy for the default --out, else <--out>-raw)")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="run nothing: recompute a saved result's targets, rewrite them into it, print, plot")
    if "--quick" in sys.argv[1:]:
        p.set_defaults(**QUICK)  # flags given explicitly still win
    args = p.parse_args()
    args.raw = args.raw or raw_dir(args.out)
    try:
        args.workloads = [w for w in dict.fromkeys(args.workloads.split(",")) if w]
        args.ks = sorted({int(k) for k in args.ks.split(",")})
        args.rates = {name: parse_rate(getattr(args, name)) for name in RATE_NAMES}
    except ValueError as e:
        p.error(str(e))
    if not args.workloads or set(args.workloads) - set(WORKLOADS):
        p.error(f"--workloads takes names from {', '.join(WORKLOADS)}")
    if 0 not in args.ks or not all(0 <= k <= K_MAX for k in args.ks):
        p.error(f"--ks must include 0 (the reference) and stay within 0..{K_MAX}")
    if (args.duration <= 0 or args.min_requests < 1 or args.max_tokens < 2 or args.profile_requests < 1
            or args.rounds < 1):
        p.error("need --duration > 0, --min-requests >= 1, --max-tokens >= 2, --profile-requests >= 1 "
                "and --rounds >= 1")
    return args


def parse_rate(text: str) -> tuple[str, float]:
    """("rps", r) for a plain number, ("x", f) for "Fx"; both positive."""
    kind, number = ("x", text[:-1]) if text.endswith("x") else ("rps", text)
    value = float(number)
    if not value > 0:
        raise ValueError(f"a rate must be positive, got {text!r}")
    return kind, value


def log(text: str) -> None:
    print(f"[spec-policy {time.perf_counter() - STARTED:5.0f} s] {text}", file=sys.stderr, flush=True)


def policies(args: argparse.Namespace) -> dict[str, int | None]:
    """Policy name -> the request's num_speculative_tokens (None: the router chooses)."""
    return {**{f"k={k}": k for k in args.ks}, ADAPTIVE: None}


# ----------------------------------------------------------------------------- workloads


def workload_texts(name: str) -> list[tuple[str, str]]:
    """(kind, text): "chat" texts go through the chat template, "raw" ones are sent as they are."""
    if name == "lookup":
        return [("chat", text) for text in EXTRACTIVE]
    return [("chat", text) for text in CHAT_QUESTIONS] + [("raw", text) for text in PROMPTS]


def prompt_text(tokenizer: Tokenizer, kind: str, text: str) -> str:
    """What is sent: the text, or the chat template's rendering of it as a user turn."""
    return text if kind == "raw" else tokenizer.apply_chat_template([{"role": "user", "content": text}])


def prompt_indices(num_prompts: int, num_requests: int, seed: int) -> list[int]:
    """The prompts of a round's requests: a seeded order, each prompt used about equally often.
    (The requests' arrival times come from the runner's Poisson schedule, same seed.)"""
    order = random.Random(seed).sample(range(num_prompts), num_prompts)
    return [order[i % num_prompts] for i in range(num_requests)]


def request_specs(prompts: list[tuple[str, int]], indices: list[int], max_tokens: int) -> list[RequestSpec]:
    """A request per index into prompts (text, tokens)."""
    return [RequestSpec(i, *prompts[j], max_tokens, "bench.speculation_policy") for i, j in enumerate(indices)]


def initial_k(client: GrpcClient) -> int:
    """The k a request of this client starts with: its pinned k, else the decode worker's default."""
    return K_DEFAULT if client.num_speculative_tokens is None else client.num_speculative_tokens


def cluster_config(workload: str) -> ClusterConfig:
    return ClusterConfig(mode="disaggregated", num_threads=1, engine=ENGINE, decode_engine=DECODE_ENGINE,
                         store=StoreConfig(prefix=f"bench.spec-policy-{workload}"))


# ------------------------------------------------------------------------------- measuring


async def isolated_profile(client: GrpcClient, prompts: list[tuple[str, int]], args: argparse.Namespace) -> dict:
    """k=0 requests one at a time: the median E2E (the unit of "Fx" rates), TTFT and TPOT, and the
    SLOs derived from them unless given."""
    specs = request_specs(prompts, [i % len(prompts) for i in range(args.profile_requests)], args.max_tokens)
    metrics = [await send_alone(client, spec) for spec in specs]
    e2e, ttft, tpot = (statistics.median(getattr(m, key) for m in metrics) for key in ("e2e_s", "ttft_s", "tpot_s"))
    return {
        "num_requests": len(metrics), "isolated_e2e_s": e2e, "isolated_ttft_s": ttft, "isolated_tpot_s": tpot,
        "ttft_s": args.ttft_slo or args.ttft_slo_scale * ttft, "tpot_s": args.tpot_slo or args.tpot_slo_scale * tpot,
        "ttft_source": "--ttft-slo" if args.ttft_slo else f"{args.ttft_slo_scale:g} x isolated TTFT (k=0)",
        "tpot_source": "--tpot-slo" if args.tpot_slo else f"{args.tpot_slo_scale:g} x isolated TPOT (k=0)",
    }


async def run_policy(server: Server, client: GrpcClient, specs: list[RequestSpec], rate: float, seed: int,
                     slo: SLO) -> Run:
    """Every request of the round with the client's k, on the seeded Poisson schedule."""
    changes, load = server.router.speculation.num_k_changes, os.getloadavg()[0]
    result = await run(client, specs, POISSON, rate, seed=seed, timeout_s=REQUEST_TIMEOUT_S)
    extra = {"num_k_changes": server.router.speculation.num_k_changes - changes, "load_average_at_start": load}
    entry = run_entry(result.records, slo, rate, result.duration_s, initial_k(client), extra)
    return Run(entry, result.records, client.take_outputs(len(specs)))


async def measure_rate(server: Server, clients: dict[str, GrpcClient], prompts: list[tuple[str, int]], rate: float,
                       seed: int, args: argparse.Namespace, slo: SLO, raw: Path) -> dict:
    """``--rounds`` rounds; in round i every policy runs the same new arrivals (seed + 100 i), in
    the policy order rotated by i. Each run's records go to raw as JSONL."""
    num = max(args.min_requests, round(rate * args.duration))
    names = list(clients)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    rounds = []
    for i in range(args.rounds):
        round_seed, indices = seed + 100 * i, prompt_indices(len(prompts), num, seed + 100 * i)
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            specs = request_specs(prompts, indices, args.max_tokens)
            runs[name].append(r := await run_policy(server, clients[name], specs, rate, round_seed, slo))
            raw.mkdir(parents=True, exist_ok=True)
            write_jsonl(raw / f"round{i + 1}-{name}.jsonl", r.records)
            log(f"  round {i + 1}/{args.rounds} {name}: mean E2E {r.entry['e2e_mean_s'] or float('nan'):.2f} s, "
                f"{r.entry['throughput_rps']:.2f} req/s, attainment {r.entry['attainment']:.0%}, "
                f"failed {r.entry['num_failed']}")
        rounds.append({"seed": round_seed, "order": order, "arrivals_unit_s": POISSON.offsets(1.0, num, round_seed),
                       "prompt_indices": indices, "policies": {name: runs[name][i].entry for name in names}})
    outputs = {name: [o for r in runs[name] for o in r.outputs] for name in names}
    return {
        "rate_rps": rate, "num_requests": num, "num_rounds": args.rounds,
        "policies": {name: pool(runs[name], rate, slo, initial_k(clients[name])) for name in names},
        "agreement_with_k0": {name: output_agreement(outputs["k=0"], outputs[name]) for name in names if name != "k=0"},
        "rounds": rounds,
    }


def measure_workload(name: str, tokenizer: Tokenizer, args: argparse.Namespace) -> dict:
    texts = workload_texts(name)
    sent = [prompt_text(tokenizer, kind, text) for kind, text in texts]
    prompts = [(text, len(tokenizer.encode(text))) for text in sent]
    log(f"{name}: starting the server")
    server = start_server(cluster_config(name))
    try:
        result = asyncio.run(_measure_workload(server, name, prompts, args))
    finally:
        stop_server(server)
    result["prompts"] = [{"kind": kind, "text": text, "tokens": n} for (kind, text), (_, n) in zip(texts, prompts)]
    by_policy = {p: [(r["rate_rps"], r["policies"][p]["attainment"]) for r in result["rates"].values()]
                 for p in policies(args)}
    result["goodput"] = {p: goodput_note(points) for p, points in by_policy.items()}
    return result


async def _measure_workload(server: Server, name: str, prompts: list[tuple[str, int]],
                            args: argparse.Namespace) -> dict:
    """Warm-up, the isolated profile, then every rate; a client per policy."""
    async with contextlib.AsyncExitStack() as stack:
        clients = {p: await stack.enter_async_context(bench_client(server.address, k))
                   for p, k in policies(args).items()}
        for client in clients.values():  # first-call costs; the router's acceptance prior sees this workload
            await send_together(client, request_specs(prompts, [0, 1], args.max_tokens))
            client.take_outputs(0)
        profile = await isolated_profile(clients["k=0"], prompts, args)
        log(f"{name}: isolated k=0 E2E {profile['isolated_e2e_s']:.2f} s, TTFT {profile['isolated_ttft_s']:.3f} s, "
            f"TPOT {profile['isolated_tpot_s'] * 1e3:.1f} ms")
        slo = SLO(1000 * profile["ttft_s"], 1000 * profile["tpot_s"])
        result: dict = {"profile": profile, "rates": {}}
        for i, rate_name in enumerate(RATE_NAMES):
            kind, value = args.rates[rate_name]
            rate = value / profile["isolated_e2e_s"] if kind == "x" else value
            log(f"{name} {rate_name}: {rate:.3g} req/s")
            measured = await measure_rate(server, clients, prompts, rate, args.seed * 1000 + i, args, slo,
                                          args.raw / name / rate_name)
            result["rates"][rate_name] = {"given": getattr(args, rate_name), **measured}
    return result


def main() -> None:
    args = parse_args()
    if args.report:
        publish(json.loads(args.report.read_text()), args.report)
        return
    machine = prepare_machine(None)
    tokenizer = load_tokenizer(None)
    ray.init(num_cpus=2, include_dashboard=False, namespace=RAY_NAMESPACE)
    try:
        workloads = {name: measure_workload(name, tokenizer, args) for name in args.workloads}
    finally:
        ray.shutdown()
    result = {
        "benchmark": "speculation_policy", "command": command_line(),
        "machine": {**machine, "ray": ray.__version__}, "revision": git_revision(ROOT),
        "model": default_model_path().name,
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "cluster": {w: dataclasses.asdict(cluster_config(w)) for w in args.workloads}},
        "workloads": workloads,
    }
    result["wall_time_s"] = time.perf_counter() - STARTED
    publish(result, args.out)
    print(f"wrote {args.out} ({result['wall_time_s'] / 60:.1f} min); request records under {args.raw}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
