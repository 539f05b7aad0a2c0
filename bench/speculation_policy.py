"""Speculation policy through the real cluster: fixed k in {0, 2, 4} against the router's adaptive k.

One Server per workload (disaggregated, 1 prefill + 1 decode worker, 1 thread each; n-gram
speculation on the decode worker, k up to 8; prefix caching off). The policy is per request: a
pinned k (``num_speculative_tokens=k``) or adaptive (unset: the router chooses each request's k
from acceptance and the decode step model). At each rate (low, medium, high) every policy runs
the same seeded Poisson arrivals and prompts against the same server, one run after another, in
``--rounds`` rounds (new arrivals each round; the policy order rotated, so each policy runs in every
position and the host's slow drift lands on all of them); a policy's numbers pool its rounds.

Workloads: ``lookup`` (bench/speculation.py's extractive prompts: repeat or summarize a passage
given in the prompt, so n-gram drafts are accepted) and ``chat`` (open questions through the chat
template and tests/conftest.py's prompts); 64 tokens each, greedy, EOS ignored.

    .venv/bin/python bench/speculation_policy.py            # the full run, 35-50 min (make bench-spec-policy)
    .venv/bin/python bench/speculation_policy.py --quick    # smoke, ~3 min; JSON to the temp dir
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from common import git_revision, markdown_table, output_agreement, prepare_machine  # noqa: E402
from disaggregated import (  # noqa: E402  (it puts the repository root on sys.path)
    ROOT, goodput, request_metrics, run_load, start_server, stop_server, stream_request, summarize_load,
)
from speculation import CHAT_QUESTIONS, WORKLOADS as SPECULATION_WORKLOADS  # noqa: E402
from tests.conftest import PROMPTS  # noqa: E402

from splitserve.cluster.deployment import RAY_NAMESPACE, ClusterConfig  # noqa: E402
from splitserve.cluster.serve import Server  # noqa: E402
from splitserve.config import EngineConfig, SpeculativeConfig  # noqa: E402
from splitserve.engine.loader import default_model_path, load_tokenizer  # noqa: E402
from splitserve.engine.tokenizer import Tokenizer  # noqa: E402
from splitserve.router.client import GenerationClient  # noqa: E402

STARTED = time.perf_counter()
WORKLOADS = ("lookup", "chat")
RATE_NAMES = ("low", "medium", "high")
ADAPTIVE = "adaptive"
K_DEFAULT, K_MAX = 3, 8  # the decode worker's k for unpinned requests until the router changes it; the cap
LOW_LOAD_SPEEDUP = 1.5  # target: adaptive mean E2E >= 1.5x lower than k=0 at low load on lookup
SATURATION_SLACK = 0.05  # target: adaptive mean E2E at most 5% above k=0's at the high rate
BOOTSTRAP_RESAMPLES = 4000  # for the 95% interval of adaptive / best fixed
ENGINE = EngineConfig(enable_prefix_caching=False)  # every policy sends the same prompts
DECODE_ENGINE = dataclasses.replace(ENGINE, speculative=SpeculativeConfig(
    "ngram", num_speculative_tokens=K_DEFAULT, max_speculative_tokens=K_MAX))
QUICK = {"duration": 3.0, "min_requests": 2, "profile_requests": 2, "max_tokens": 32, "rounds": 1,
         "out": Path(tempfile.gettempdir()) / "speculation_policy-quick.json"}  # never over the real results


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "speculation_policy.json")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="run nothing: recompute a saved result's targets, rewrite them into it, print, plot")
    if "--quick" in sys.argv[1:]:
        p.set_defaults(**QUICK)  # flags given explicitly still win
    args = p.parse_args()
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
    """(kind, text): "chat" texts go through the chat template, "raw" ones are encoded as they are."""
    if name == "lookup":
        return [("chat", text) for text in SPECULATION_WORKLOADS["extractive"]]
    return [("chat", text) for text in CHAT_QUESTIONS] + [("raw", text) for text in PROMPTS]


def encode(tokenizer: Tokenizer, kind: str, text: str) -> list[int]:
    if kind == "raw":
        return tokenizer.encode(text)
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]),
                            add_special_tokens=False)


def arrivals(prompts: list[list[int]], num_requests: int, max_tokens: int, seed: int) -> list[dict]:
    """Requests at rate 1 (run_load scales by 1 / rate): seeded exponential gaps; the prompts in a
    seeded order, each used about equally often."""
    rng = random.Random(seed)
    order = rng.sample(range(len(prompts)), len(prompts))
    requests, t = [], 0.0
    for i in range(num_requests):
        index = order[i % len(order)]
        requests.append({"arrival_unit_s": t, "prompt": prompts[index], "prompt_index": index,
                         "max_tokens": max_tokens})
        t += rng.expovariate(1.0)
    return requests


def cluster_config(workload: str) -> ClusterConfig:
    return ClusterConfig(mode="disaggregated", num_threads=1, engine=ENGINE, decode_engine=DECODE_ENGINE,
                         store_prefix=f"bench.spec-policy-{workload}")


# ------------------------------------------------------------------------------- measuring


def warm_up(client: GenerationClient, prompts: list[list[int]], args: argparse.Namespace) -> None:
    """Two concurrent requests per policy: first-call costs, and the router's acceptance prior
    starts from this workload's drafts."""
    for k in policies(args).values():
        run_load(client, [{"arrival_unit_s": 0.0, "prompt": p, "max_tokens": args.max_tokens,
                           "num_speculative_tokens": k} for p in prompts[:2]], 1.0)


def isolated_profile(client: GenerationClient, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """k=0 requests one at a time: the median E2E (the unit of "Fx" rates), TTFT and TPOT, and the
    SLOs derived from them unless given."""
    metrics = []
    for prompt in (prompts[i % len(prompts)] for i in range(args.profile_requests)):
        m = request_metrics(stream_request(client, prompt, args.max_tokens, 0), args.max_tokens)
        if not m["ok"]:
            raise RuntimeError(f"an isolated profile request failed: {m}")
        metrics.append(m)
    e2e, ttft, tpot = (statistics.median(m[key] for m in metrics) for key in ("e2e_s", "ttft_s", "tpot_s"))
    return {
        "num_requests": len(metrics), "isolated_e2e_s": e2e, "isolated_ttft_s": ttft, "isolated_tpot_s": tpot,
        "ttft_s": args.ttft_slo or args.ttft_slo_scale * ttft, "tpot_s": args.tpot_slo or args.tpot_slo_scale * tpot,
        "ttft_source": "--ttft-slo" if args.ttft_slo else f"{args.ttft_slo_scale:g} x isolated TTFT (k=0)",
        "tpot_source": "--tpot-slo" if args.tpot_slo else f"{args.tpot_slo_scale:g} x isolated TPOT (k=0)",
    }


def run_policy(server: Server, client: GenerationClient, requests: list[dict], rate: float, k: int | None,
               slo: dict) -> dict:
    """One run: every request of the rate with this policy's k; the load summary plus speculation."""
    changes, load = server.router.num_k_changes, os.getloadavg()[0]
    records = run_load(client, [{**r, "num_speculative_tokens": k} for r in requests], rate)
    summary = summarize_load(records, requests, slo)
    good = [m for m in summary["per_request"] if m["ok"]]
    return {
        **summary, **speculation_summary(records, K_DEFAULT if k is None else k),
        "e2e_mean_s": mean([m["e2e_s"] for m in good]), "tpot_mean_s": mean([m["tpot_s"] for m in good]),
        # requests meeting the SLO per second of the run (attainment x requests / the run's span)
        "slo_met_rps": summary["throughput_rps"] * summary["attainment"] * len(requests) / len(good) if good else 0.0,
        "num_k_changes": server.router.num_k_changes - changes,
        "load_average_at_start": load, "requests": records,
    }


def speculation_summary(records: list[dict], initial_k: int) -> dict:
    """From the router's reports: the k it set (k_history: the initial k, then each change; an
    empty history means ``initial_k`` throughout; mean over each request's settings, then over
    requests), drafts per verification step and acceptance."""
    done = [(r["report"], len(r["token_ids"])) for r in records if r["report"] is not None and not r["error"]]
    drafts = sum(rep["draft_tokens"] for rep, _ in done)
    accepted = sum(rep["accepted_tokens"] for rep, _ in done)
    steps = sum(n - 1 - rep["accepted_tokens"] for rep, n in done)  # the first token comes from the prefill
    return {
        "k_set_mean": mean([statistics.fmean(rep["k_history"] or [initial_k]) for rep, _ in done]),
        "k_final_mean": mean([(rep["k_history"] or [initial_k])[-1] for rep, _ in done]),
        "drafts_per_step": drafts / steps if steps else None,
        "acceptance_rate": accepted / drafts if drafts else None,
        "num_draft_tokens": drafts, "num_accepted_tokens": accepted, "num_verify_steps": steps,
    }


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def pool(runs: list[dict], initial_k: int) -> dict:
    """One policy's rounds at one rate as one sample: means and percentiles over all their
    requests, attainment over all requests, per-second rates over the summed spans."""
    metrics = [m for run in runs for m in run["per_request"]]
    good = [m for m in metrics if m["ok"]]
    span = math.fsum(run["span_s"] for run in runs)
    met = sum(run["attainment"] * run["num_requests"] for run in runs)
    return {
        "num_requests": len(metrics), "num_failed": len(metrics) - len(good),
        **{key: {f"p{q}": float(np.percentile(values, q)) if values else None for q in (50, 90, 99)}
           for key, values in ((key, [m[key] for m in good]) for key in ("ttft_s", "tpot_s", "e2e_s"))},
        "e2e_mean_s": mean([m["e2e_s"] for m in good]), "tpot_mean_s": mean([m["tpot_s"] for m in good]),
        "e2e_mean_s_by_round": [run["e2e_mean_s"] for run in runs],
        "throughput_rps": len(good) / span, "attainment": met / len(metrics), "slo_met_rps": met / span,
        **speculation_summary([rec for run in runs for rec in run["requests"]], initial_k),
        "num_k_changes": sum(run["num_k_changes"] for run in runs),
    }


def measure_rate(server: Server, client: GenerationClient, prompts: list[list[int]], rate: float, seed: int,
                 args: argparse.Namespace, slo: dict) -> dict:
    """``--rounds`` rounds; in round i every policy runs the same new arrivals (seed + 100 i), in
    the policy order rotated by i."""
    num = max(args.min_requests, round(rate * args.duration))
    ks = policies(args)
    names = list(ks)
    rounds = []
    for i in range(args.rounds):
        requests = arrivals(prompts, num, args.max_tokens, seed + 100 * i)
        order = names[i % len(names):] + names[:i % len(names)]
        runs = {}
        for name in order:
            runs[name] = r = run_policy(server, client, requests, rate, ks[name], slo)
            log(f"  round {i + 1}/{args.rounds} {name}: mean E2E {r['e2e_mean_s'] or float('nan'):.2f} s, "
                f"{r['throughput_rps']:.2f} req/s, attainment {r['attainment']:.0%}, failed {r['num_failed']}")
        rounds.append({"seed": seed + 100 * i, "order": order,
                       "arrivals_unit_s": [r["arrival_unit_s"] for r in requests],
                       "prompt_indices": [r["prompt_index"] for r in requests],
                       "policies": {name: runs[name] for name in names}})

    def outputs(name: str) -> list[list[int]]:
        return [rec["token_ids"] for r in rounds for rec in r["policies"][name]["requests"]]

    return {
        "rate_rps": rate, "num_requests": num, "num_rounds": args.rounds,
        "policies": {name: pool([r["policies"][name] for r in rounds], K_DEFAULT if k is None else k)
                     for name, k in ks.items()},
        "agreement_with_k0": {name: output_agreement(outputs("k=0"), outputs(name)) for name in names if name != "k=0"},
        "rounds": rounds,
    }


def measure_workload(name: str, tokenizer: Tokenizer, args: argparse.Namespace) -> dict:
    texts = workload_texts(name)
    prompts = [encode(tokenizer, kind, text) for kind, text in texts]
    log(f"{name}: starting the server")
    server = start_server(cluster_config(name))
    try:
        with GenerationClient(server.address) as client:
            warm_up(client, prompts, args)
            profile = isolated_profile(client, prompts, args)
            log(f"{name}: isolated k=0 E2E {profile['isolated_e2e_s']:.2f} s, TTFT {profile['isolated_ttft_s']:.3f} s, "
                f"TPOT {profile['isolated_tpot_s'] * 1e3:.1f} ms")
            result = {"prompts": [{"kind": kind, "text": text, "tokens": len(ids)} for (kind, text), ids
                                  in zip(texts, prompts)], "profile": profile, "rates": {}}
            for i, rate_name in enumerate(RATE_NAMES):
                kind, value = args.rates[rate_name]
                rate = value / profile["isolated_e2e_s"] if kind == "x" else value
                log(f"{name} {rate_name}: {rate:.3g} req/s")
                result["rates"][rate_name] = {
                    "given": getattr(args, rate_name),
                    **measure_rate(server, client, prompts, rate, args.seed * 1000 + i, args, profile)}
    finally:
        stop_server(server)
    by_policy = {p: {f"{r['rate_rps']:g}": r["policies"][p] for r in result["rates"].values()} for p in policies(args)}
    result["goodput"] = {p: goodput(by_rate) for p, by_rate in by_policy.items()}
    return result


# ---------------------------------------------------------------------------------- report


def targets(workloads: dict) -> list[dict]:
    """The issue's three targets, on mean E2E latency over completed requests (a failed adaptive
    request fails the target)."""
    out = []
    for rate_name in RATE_NAMES:
        for workload, w in workloads.items():
            runs = w["rates"][rate_name]["policies"]
            e2e = {p: r["e2e_mean_s"] for p, r in runs.items()}
            ok = runs[ADAPTIVE]["num_failed"] == 0 and e2e[ADAPTIVE] is not None
            fixed = {p: v for p, v in e2e.items() if p != ADAPTIVE and v is not None}
            best = min(fixed, key=fixed.__getitem__)
            ratio = e2e[ADAPTIVE] / fixed[best] if ok else None
            # the same ratio round by round (paired: both ran the same arrivals minutes apart)
            by_round = [r["policies"][ADAPTIVE]["e2e_mean_s"] / r["policies"][best]["e2e_mean_s"]
                        for r in w["rates"][rate_name]["rounds"]
                        if r["policies"][ADAPTIVE]["e2e_mean_s"] and r["policies"][best]["e2e_mean_s"]]
            interval = paired_interval(w["rates"][rate_name]["rounds"], list(fixed)) if ok else None
            text = _ratio(ratio, "x best fixed")
            if ok:
                notes = [f"by round: {', '.join(f'{v:.2f}' for v in by_round)}"] if len(by_round) > 1 else []
                notes += [f"95% interval {interval[0]:.2f}-{interval[1]:.2f}"] if interval else []
                text += f" ({'; '.join(notes)})" if notes else ""
            met = ok and ratio <= 1.0
            out.append({"rate": rate_name, "workload": workload, "target": f"adaptive <= best fixed ({best})",
                        "value": ratio, "by_round": by_round, "interval95": interval, "text": text, "met": met,
                        "within_noise": not met and interval is not None and interval[0] <= 1.0})
            if rate_name == "low" and workload == "lookup":
                speedup = e2e["k=0"] / e2e[ADAPTIVE] if ok else None
                out.append({"rate": rate_name, "workload": workload,
                            "target": f"adaptive >= {LOW_LOAD_SPEEDUP:g}x lower mean latency than k=0",
                            "value": speedup, "text": _ratio(speedup, "x lower"),
                            "met": ok and speedup >= LOW_LOAD_SPEEDUP})
            if rate_name == "high":
                over = e2e[ADAPTIVE] / e2e["k=0"] - 1 if ok else None
                out.append({"rate": rate_name, "workload": workload,
                            "target": f"adaptive at most {SATURATION_SLACK:.0%} worse than k=0 at saturation",
                            "value": over, "text": "—" if over is None else f"{over:+.1%}",
                            "met": ok and over <= SATURATION_SLACK})
    return out


def paired_interval(rounds: list[dict], fixed: list[str], resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = 0) -> tuple[float, float] | None:
    """95% interval of adaptive / best fixed k (mean E2E) by a paired two-stage bootstrap.

    Each resample draws rounds with replacement, then each drawn round's requests with
    replacement, the same draws for every policy (a round's policies ran the same arrivals and
    prompts). Drawing rounds carries the host's drift from one round to the next; drawing requests
    the spread within a run. The best fixed k is picked again in every resample, so the interval
    also carries the luck of choosing the best of several noisy means after the fact. Requests
    that failed under any policy are left out."""
    names = [ADAPTIVE, *fixed]
    blocks = []  # per round: policies x requests
    for rnd in rounds:
        per = [rnd["policies"][name]["per_request"] for name in names]
        keep = [i for i in range(len(per[0])) if all(p[i]["ok"] for p in per)]
        if keep:
            blocks.append(np.array([[p[i]["e2e_s"] for i in keep] for p in per]))
    if not blocks:
        return None
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    for j in range(resamples):
        sums = np.zeros(len(names))
        for b in rng.integers(0, len(blocks), size=len(blocks)):
            block = blocks[b]
            sums += block[:, rng.integers(0, block.shape[1], size=block.shape[1])].sum(axis=1)
        ratios[j] = sums[0] / sums[1:].min()  # sums, not means: the request count cancels
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def _ratio(value: float | None, unit: str) -> str:
    return "— (adaptive had failed requests)" if value is None else f"{value:.2f}{unit}"


def workload_table(w: dict) -> str:
    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v * 1e3:.0f}"

    def num(v: float | None, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    header = ["rate", "req/s", "policy", "mean E2E ms", "by round", "vs k=0", "p99 E2E ms", "mean TPOT ms",
              "TTFT p50 ms",
              "done req/s", "SLO attain.", "SLO-met req/s", "k set", "drafts/step", "accept", "k changes", "failed"]
    body = []
    for rate_name, r in w["rates"].items():
        k0 = r["policies"]["k=0"]["e2e_mean_s"]
        for policy, s in r["policies"].items():
            vs = s["e2e_mean_s"] / k0 if s["e2e_mean_s"] is not None and k0 else None
            body.append([rate_name, f"{r['rate_rps']:.3g}", policy, ms(s["e2e_mean_s"]),
                         " / ".join(map(ms, s["e2e_mean_s_by_round"])), num(vs, ".2f"),
                         ms(s["e2e_s"]["p99"]), ms(s["tpot_mean_s"]), ms(s["ttft_s"]["p50"]),
                         f"{s['throughput_rps']:.2f}", f"{s['attainment']:.0%}", f"{s['slo_met_rps']:.2f}",
                         num(s["k_set_mean"], ".1f"), num(s["drafts_per_step"], ".2f"),
                         num(s["acceptance_rate"], ".2f"), str(s["num_k_changes"]), str(s["num_failed"])])
    return markdown_table(header, body)


def report(result: dict) -> str:
    m = result["machine"]
    lines = [f"date {m['date']}, nproc {m['nproc']}, ray {m['ray']}, load average at start "
             f"{m['load_average_at_start'][0]:.2f}, revision {result['revision']}"]
    for name, w in result["workloads"].items():
        p = w["profile"]
        lens = sorted(x["tokens"] for x in w["prompts"])
        lines += ["", f"{name}: {len(lens)} prompts of {lens[0]}-{lens[-1]} tokens, {result['config']['max_tokens']} "
                  f"output tokens; isolated k=0: E2E {p['isolated_e2e_s'] * 1e3:.0f} ms, TTFT "
                  f"{p['isolated_ttft_s'] * 1e3:.0f} ms, TPOT {p['isolated_tpot_s'] * 1e3:.1f} ms (median of "
                  f"{p['num_requests']}); SLO TTFT <= {p['ttft_s'] * 1e3:.0f} ms ({p['ttft_source']}), TPOT <= "
                  f"{p['tpot_s'] * 1e3:.0f} ms ({p['tpot_source']})",
                  "rates: " + ", ".join(f"{n} {r['rate_rps']:.3g} req/s ({r['given']}, {r['num_rounds']} x "
                                        f"{r['num_requests']} requests)" for n, r in w["rates"].items()),
                  "", workload_table(w), ""]
        for rate_name, r in w["rates"].items():
            same = ", ".join(f"{p} {a['identical_requests']}/{a['requests']}"
                             for p, a in r["agreement_with_k0"].items())
            lines.append(f"greedy outputs identical to k=0's at {rate_name}: {same}")
        for policy, g in w["goodput"].items():
            value = "—" if g["goodput_rps"] is None else f"{g['goodput_rps']:.2f} req/s"
            lines.append(f"goodput {policy}: {value} ({g['note']})")
    lines += ["", "Targets (mean E2E latency over completed requests)"]
    for rate_name in RATE_NAMES:
        for t in (t for t in result["targets"] if t["rate"] == rate_name):
            verdict = "MET" if t["met"] else "NOT met" + (" (within noise)" if t.get("within_noise") else "")
            lines.append(f"{rate_name} {t['workload']}: {t['target']}: {t['text']} {verdict}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str:
    """Mean E2E latency against rate, one line per policy, one panel per workload; the bars span
    the policy's round means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = result["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
    for ax, (name, w) in zip(axes[0], workloads.items()):
        rates = [r["rate_rps"] for r in w["rates"].values()]
        for policy in next(iter(w["rates"].values()))["policies"]:
            runs = [(r["rate_rps"], r["policies"][policy]) for r in w["rates"].values()]
            points = [(x, s["e2e_mean_s"], [v for v in s["e2e_mean_s_by_round"] if v is not None])
                      for x, s in runs if s["e2e_mean_s"] is not None]
            xs, ys, by_round = zip(*points)
            spread = [[y - min(v) for y, v in zip(ys, by_round)], [max(v) - y for y, v in zip(ys, by_round)]]
            ax.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, label=policy)
        ax.set(xscale="log", title=name, xlabel="request rate (req/s, log scale)", ylabel="mean E2E latency (s)")
        ax.set_xticks(rates, [f"{n}\n{r:.2g}" for n, r in zip(w["rates"], rates)])
        ax.set_xticks([], minor=True)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


# ------------------------------------------------------------------------------------ main


def publish(result: dict, path: Path) -> None:
    """Score the targets, write the JSON to ``path`` and the plot beside it, print the tables."""
    result["targets"] = targets(result["workloads"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(report(result))
    print(plot(result, path.with_suffix(".png")))


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
        "benchmark": "speculation_policy", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {**machine, "ray": ray.__version__}, "revision": git_revision(ROOT),
        "model": default_model_path().name,
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "cluster": {w: dataclasses.asdict(cluster_config(w)) for w in args.workloads}},
        "workloads": workloads,
    }
    result["wall_time_s"] = time.perf_counter() - STARTED
    publish(result, args.out)
    print(f"wrote {args.out} ({result['wall_time_s'] / 60:.1f} min)", file=sys.stderr)


if __name__ == "__main__":
    main()
