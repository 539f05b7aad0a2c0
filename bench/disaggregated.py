"""Disaggregated serving against colocated serving, side by side in one run, over the real workers.

Part 1, handoff cost: for each prompt length, the time to the first token of one request at a
time, (a) on an in-process ``LLMEngine`` (1 thread, no gRPC: the local prefill), (b) over gRPC
to a colocated worker (1 thread) and (c) over gRPC to a disaggregated pair (1 prefill + 1 decode
worker, 1 thread each) for each KV transfer backend and layers-per-chunk. (c) / (b) is the
handoff overhead; the local prefill runs again beside every server so drift shows. The prefill
actor is also called directly (reserve on the decode worker, then ``prefill``) for its
``prefill_s``, ``handoff_wait_s`` and KV bytes.

Part 2, load: seeded Poisson arrivals of mixed-length requests against disaggregated 1P+1D
(1 thread each), colocated 1 worker x 2 threads and colocated 2 workers x 1 thread (2 cores in
each); per-request TTFT, TPOT and latency, SLO attainment and throughput.

One Ray for the run (2 CPUs); one Server per system, stopped before the next starts.

    .venv/bin/python bench/disaggregated.py                 # the full run (make bench-disagg)
    .venv/bin/python bench/disaggregated.py --quick       # smoke, a few minutes; JSON to the temp dir
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import ray
import torch

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(ROOT))  # tests.conftest: the shared prompts
from common import git_revision, markdown_table, output_agreement, prepare_machine, random_prompts  # noqa: E402
from tests.conftest import PROMPTS  # noqa: E402

from splitserve.cluster.deployment import RAY_NAMESPACE, ClusterConfig  # noqa: E402
from splitserve.cluster.serve import Server, ServeOptions  # noqa: E402
from splitserve.config import EngineConfig  # noqa: E402
from splitserve.engine.engine import LLMEngine, LoadedModel  # noqa: E402
from splitserve.engine.loader import default_model_path  # noqa: E402
from splitserve.engine.sampling_params import SamplingParams  # noqa: E402
from splitserve.router.client import GenerationClient, make_request  # noqa: E402

TARGET = 0.05  # issue: disaggregated TTFT within 5% of a prefill of the same prompt without the handoff
ATTAINMENT_FOR_GOODPUT = 0.9
REQUEST_TIMEOUT_S = 600.0
# Prefix caching off everywhere: repeats send the same prompts, and a hit would skip the prefill.
ENGINE = EngineConfig(enable_prefix_caching=False)
QUICK = {"prompt_lens": [64, 256], "repeats": 2, "layers_per_chunk": [1], "num_requests": 6, "rates": [2.0],
         "long_prompt_lens": [100, 200], "max_tokens": [8, 16],
         "out": Path(tempfile.gettempdir()) / "disaggregated-quick.json"}  # never over the real results


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--long-prompt-lens", type=ints, default=[200, 800], help="part 2 token-id prompt range")
    p.add_argument("--short-fraction", type=float, default=0.5, help="part 2 share of tests/conftest.py prompts")
    p.add_argument("--max-tokens", type=ints, default=[32, 64], help="part 2 output length range (EOS ignored)")
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds (default: --ttft-slo-scale x profile)")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds (default: --tpot-slo-scale x profile)")
    p.add_argument("--ttft-slo-scale", type=float, default=5.0, help="x isolated prefill of the median prompt")
    p.add_argument("--tpot-slo-scale", type=float, default=2.0, help="x isolated batch-1 decode step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "disaggregated.json")
    if "--quick" in sys.argv[1:]:
        p.set_defaults(**QUICK)  # flags given explicitly still win
    args = p.parse_args()
    args.backends = args.backends.split(",")
    if args.repeats < 1 or args.num_requests < 2 or min(args.rates) <= 0 or min(args.prompt_lens) < 1:
        p.error("need repeats >= 1, num-requests >= 2, rates > 0 and prompt lengths >= 1")
    if len(args.long_prompt_lens) != 2 or len(args.max_tokens) != 2 or not 0 <= args.short_fraction <= 1:
        p.error("--long-prompt-lens and --max-tokens take LOW,HIGH; --short-fraction is in [0, 1]")
    return args


# ------------------------------------------------------------------------------ systems


def handoff_systems(args: argparse.Namespace) -> dict[str, ClusterConfig]:
    systems = {"colocated": ClusterConfig(mode="colocated", num_threads=1, engine=ENGINE, store_prefix="bench.colo")}
    for backend in args.backends:
        for lpc in args.layers_per_chunk:
            systems[f"disagg-{backend}-lpc{lpc}"] = ClusterConfig(
                mode="disaggregated", transfer=backend, layers_per_chunk=lpc, num_threads=1, engine=ENGINE,
                store_prefix=f"bench.{backend}-{lpc}")
    return systems


def load_systems() -> dict[str, ClusterConfig]:
    return {
        "disagg 1P+1D x1t": ClusterConfig(mode="disaggregated", num_threads=1, engine=ENGINE,
                                          store_prefix="bench.load-disagg"),
        "colocated 1 x2t": ClusterConfig(mode="colocated", num_colocated_workers=1, num_threads=2, engine=ENGINE,
                                         store_prefix="bench.load-colo1"),
        "colocated 2 x1t": ClusterConfig(mode="colocated", num_colocated_workers=2, num_threads=1, engine=ENGINE,
                                         store_prefix="bench.load-colo2"),
    }


def start_server(config: ClusterConfig) -> Server:
    server = Server(config, ServeOptions(grpc_port=0, grace_s=5.0)).start()
    with GenerationClient(server.address) as client:
        client.wait_ready(60.0)
    return server


def stop_server(server: Server, timeout_s: float = 60.0) -> None:
    """Stop, then wait until Ray has the workers' CPUs back: ``ray.kill`` returns before the
    actors are gone, and the next deployment needs every CPU free when it starts."""
    server.stop()
    deadline = time.monotonic() + timeout_s
    total = ray.cluster_resources().get("CPU", 0)
    while ray.available_resources().get("CPU", 0) < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the stopped workers still hold CPUs after {timeout_s:g} s")
        time.sleep(0.1)


# ------------------------------------------------------------------------------- timing


def local_prefill(engine: LLMEngine, prompt: list[int]) -> float:
    """Seconds from add_request to the first token of a max_tokens=1 request (no gRPC, no handoff)."""
    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def stream_request(client: GenerationClient, prompt: list[int], max_tokens: int,
                   num_speculative_tokens: int | None = None) -> dict:
    """One streamed request (greedy, EOS ignored; num_speculative_tokens None: the server's k):
    arrival times of its messages (from the send), tokens in each, and the router's report
    from the last message (None when it carried none)."""
    request = make_request(prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True,
                           num_speculative_tokens=num_speculative_tokens)
    times, tokens, ids, report, error = [], [], [], None, None
    sent = time.perf_counter()
    try:
        for response in client.generate(request, timeout_s=REQUEST_TIMEOUT_S):
            times.append(time.perf_counter() - sent)
            tokens.append(len(response.token_ids))
            ids.extend(response.token_ids)
            if response.HasField("report"):
                report = {f.name: _plain(getattr(response.report, f.name)) for f in response.report.DESCRIPTOR.fields}
    except grpc.RpcError as e:
        error = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.Call) else str(e)
    return {"sent_s": sent, "chunk_times_s": times, "chunk_tokens": tokens, "token_ids": ids, "report": report,
            "error": error}


def _plain(value: object) -> object:
    """A protobuf scalar as is, a repeated field as a list (for JSON)."""
    return value if isinstance(value, int | float | str) else list(value)  # type: ignore[call-overload]


def direct_handoff(server: Server, prompt: list[int], request_id: str) -> dict:
    """Do what the router does, through the actors: reserve on the decode worker, prefill into
    that reservation (the result means every KV chunk landed), then release the reservation.
    Returns the call times and the PrefillResult's numbers (prefill_s, handoff_wait_s, KV bytes...)."""
    handles = server.deployment.handles
    prefix = server.config.store_prefix
    decode, prefill = handles[f"{prefix}.decode-0"], handles[f"{prefix}.prefill-0"]
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    destination = ray.get(decode.reserve.remote(request_id, prompt, params))
    reserved = time.perf_counter()
    result = ray.get(prefill.prefill.remote(request_id, prompt, params, destination))
    done = time.perf_counter()
    ray.get(decode.abort.remote(request_id))
    counts = {k: v for k, v in vars(result).items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return {"reserve_s": reserved - start, "prefill_call_s": done - reserved, **counts}


def ttft(record: dict) -> float:
    if record["error"] or not record["chunk_times_s"]:
        raise RuntimeError(f"request failed: {record['error']}")
    return record["chunk_times_s"][0]


# --------------------------------------------------------------------- part 1: handoff


def measure_handoff(name: str, config: ClusterConfig, engine: LLMEngine, prompts: dict[int, list[int]],
                    repeats: int) -> dict:
    """One server: per prompt length and repeat, local prefill, then TTFT over gRPC with
    max_tokens 1 and 2, then (disaggregated) a direct prefill-actor handoff."""
    disaggregated = config.mode == "disaggregated"
    samples = {n: {"local_s": [], "ttft_s": {"1": [], "2": []}, "direct": []} for n in prompts}
    print(f"[handoff] starting {name}", file=sys.stderr)
    server = start_server(config)
    try:
        with GenerationClient(server.address) as client:
            for n, prompt in prompts.items():  # warm-up: links, first-call costs
                ttft(stream_request(client, prompt, 2))
                if disaggregated:
                    direct_handoff(server, prompt, f"warm-{n}")
            for rep in range(repeats):
                for n, prompt in prompts.items():
                    s = samples[n]
                    s["local_s"].append(local_prefill(engine, prompt))
                    for max_tokens in (1, 2):
                        s["ttft_s"][str(max_tokens)].append(ttft(stream_request(client, prompt, max_tokens)))
                    if disaggregated:
                        s["direct"].append(direct_handoff(server, prompt, f"direct-{n}-{rep}"))
                print(f"[handoff] {name} repeat {rep + 1}/{repeats}", file=sys.stderr)
    finally:
        stop_server(server)
    return {"config": dataclasses.asdict(config), "lengths": {str(n): s for n, s in samples.items()}}


def handoff_rows(systems: dict) -> list[dict]:
    """Medians per (system, length), with each system's TTFT against the colocated one's."""
    rows = []
    colo = systems["colocated"]["lengths"]
    for name, system in systems.items():
        for n, s in system["lengths"].items():
            local = statistics.median(s["local_s"])
            row = {"system": name, "prompt_tokens": int(n), "local_s": local}
            for mt in ("1", "2"):
                t, t_colo = statistics.median(s["ttft_s"][mt]), statistics.median(colo[n]["ttft_s"][mt])
                local_colo = statistics.median(colo[n]["local_s"])
                row[f"ttft_s_mt{mt}"] = t
                row[f"vs_colocated_mt{mt}"] = t / t_colo - 1
                # Each server's TTFT over the local prefill timed beside it: machine drift between
                # the two servers' windows cancels.
                row[f"vs_colocated_drift_corrected_mt{mt}"] = (t / local) / (t_colo / local_colo) - 1
                row[f"vs_local_mt{mt}"] = t / local - 1
            for key in ("prefill_s", "handoff_wait_s", "num_kv_bytes", "num_kv_chunks"):
                values = [d[key] for d in s["direct"]]
                row[key] = statistics.median(values) if values else None
            rows.append(row)
    return rows


def handoff_table(rows: list[dict]) -> str:
    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v * 1e3:.1f}"

    def pct(v: float) -> str:
        return f"{v:+.1%}"

    header = ["system", "prompt", "local ms", "TTFT ms mt=1", "TTFT ms mt=2", "vs colo mt=1", "vs colo mt=2",
              "vs colo mt=2 (drift-corr.)", "vs local mt=2", "worker prefill ms", "handoff wait ms", "KV MiB",
              "chunks"]
    body = [[r["system"], str(r["prompt_tokens"]), ms(r["local_s"]), ms(r["ttft_s_mt1"]), ms(r["ttft_s_mt2"]),
             "—" if r["system"] == "colocated" else pct(r["vs_colocated_mt1"]),
             "—" if r["system"] == "colocated" else pct(r["vs_colocated_mt2"]),
             "—" if r["system"] == "colocated" else pct(r["vs_colocated_drift_corrected_mt2"]),
             pct(r["vs_local_mt2"]), ms(r["prefill_s"]), ms(r["handoff_wait_s"]),
             "—" if r["num_kv_bytes"] is None else f"{r['num_kv_bytes'] / 2**20:.1f}",
             "—" if r["num_kv_chunks"] is None else f"{r['num_kv_chunks']:.0f}"] for r in rows]
    lines = [markdown_table(header, body), ""]
    for r in rows:
        if r["system"] != "colocated":
            over = r["vs_colocated_mt2"]
            lines.append(f"target {r['system']} {r['prompt_tokens']} tokens: TTFT within {TARGET:.0%} of colocated "
                         f"(max_tokens=2): {over:+.1%} {'MET' if over <= TARGET else 'NOT met'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ part 2: load


def load_workload(args: argparse.Namespace, engine: LLMEngine) -> list[dict]:
    """Requests with arrival times at rate 1 (scaled by 1/rate per run): seeded Poisson gaps,
    a tests/conftest.py prompt or a random token-id prompt, a fixed output length."""
    rng = random.Random(args.seed)
    short = [engine.tokenizer.encode(p) for p in PROMPTS]
    vocab = engine.model_config.vocab_size
    requests, t = [], 0.0
    for i in range(args.num_requests):
        if rng.random() < args.short_fraction:
            prompt = short[rng.randrange(len(short))]
        else:
            prompt = random_prompts(1, *args.long_prompt_lens, vocab, seed=args.seed * 1000 + i)[0]
        requests.append({"arrival_unit_s": t, "prompt": prompt, "max_tokens": rng.randint(*args.max_tokens)})
        t += rng.expovariate(1.0)
    return requests


def slo_profile(engine: LLMEngine, workload: list[dict], args: argparse.Namespace) -> dict:
    """SLOs from an isolated profile on 1 thread, unless given: TTFT = scale x the prefill of the
    workload's median-length prompt, TPOT = scale x a batch-1 decode step."""
    median = sorted((r["prompt"] for r in workload), key=len)[len(workload) // 2]
    prefill = statistics.median(local_prefill(engine, median) for _ in range(3))
    decode = [time_decode(engine, median, 33) for _ in range(3)]
    step = statistics.median((full - first) / 32 for full, first in decode)
    return {
        "median_prompt_tokens": len(median), "isolated_prefill_s": prefill, "batch1_decode_step_s": step,
        "ttft_s": args.ttft_slo or args.ttft_slo_scale * prefill, "tpot_s": args.tpot_slo or args.tpot_slo_scale * step,
        "ttft_source": "--ttft-slo" if args.ttft_slo else f"{args.ttft_slo_scale:g} x isolated prefill",
        "tpot_source": "--tpot-slo" if args.tpot_slo else f"{args.tpot_slo_scale:g} x batch-1 decode step",
    }


def time_decode(engine: LLMEngine, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(t of max_tokens tokens, t of 1 token), back to back."""
    out = []
    for n in (max_tokens, 1):
        start = time.perf_counter()
        engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        out.append(time.perf_counter() - start)
    return out[0], out[1]


def run_load(client: GenerationClient, workload: list[dict], rate: float) -> list[dict]:
    """Send each request at its arrival time from its own thread; wait for all to end. A request
    may carry num_speculative_tokens (pinned k; absent or None: the server chooses)."""
    records: list[dict | None] = [None] * len(workload)

    def send(i: int, lag: float) -> None:
        r = workload[i]
        record = stream_request(client, r["prompt"], r["max_tokens"], r.get("num_speculative_tokens"))
        records[i] = {**record, "dispatch_lag_s": lag}

    threads, start = [], time.perf_counter()
    for i, r in enumerate(workload):
        due = start + r["arrival_unit_s"] / rate
        time.sleep(max(due - time.perf_counter(), 0))
        thread = threading.Thread(target=send, args=(i, time.perf_counter() - due), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return [{**rec, "sent_s": rec["sent_s"] - start} for rec in records]  # type: ignore[misc]


def request_metrics(rec: dict, max_tokens: int) -> dict:
    """TTFT, TPOT, E2E (BENCHMARKS.md definitions); ok: it produced exactly max_tokens tokens."""
    times, n = rec["chunk_times_s"], sum(rec["chunk_tokens"])
    ok = rec["error"] is None and n == max_tokens and bool(times)
    if not ok:
        return {"ok": False, "ttft_s": None, "tpot_s": None, "e2e_s": None, "output_tokens": n}
    tpot = (times[-1] - times[0]) / (n - 1) if n > 1 else 0.0
    return {"ok": True, "ttft_s": times[0], "tpot_s": tpot, "e2e_s": times[-1], "output_tokens": n}


def summarize_load(records: list[dict], workload: list[dict], slo: dict) -> dict:
    metrics = [request_metrics(rec, r["max_tokens"]) for rec, r in zip(records, workload)]
    good = [m for m in metrics if m["ok"]]
    ends = [rec["sent_s"] + rec["chunk_times_s"][-1] for rec, m in zip(records, metrics) if m["ok"]]
    span = max(ends) - min(rec["sent_s"] for rec in records) if ends else float("nan")

    def pcts(key: str) -> dict:
        values = [m[key] for m in good]
        return {f"p{q}": float(np.percentile(values, q)) if values else None for q in (50, 90, 99)}

    meets = [m["ok"] and m["ttft_s"] <= slo["ttft_s"] and m["tpot_s"] <= slo["tpot_s"] for m in metrics]
    return {
        "num_requests": len(metrics), "num_failed": len(metrics) - len(good),
        "ttft_s": pcts("ttft_s"), "tpot_s": pcts("tpot_s"), "e2e_s": pcts("e2e_s"),
        "span_s": span, "throughput_rps": len(good) / span,
        "output_tok_s": sum(m["output_tokens"] for m in good) / span,
        "attainment": sum(meets) / len(metrics),
        "ttft_attainment": sum(m["ok"] and m["ttft_s"] <= slo["ttft_s"] for m in metrics) / len(metrics),
        "tpot_attainment": sum(m["ok"] and m["tpot_s"] <= slo["tpot_s"] for m in metrics) / len(metrics),
        "max_dispatch_lag_s": max(rec["dispatch_lag_s"] for rec in records),
        "per_request": metrics,
    }


def goodput(by_rate: dict[str, dict]) -> dict:
    """DistServe goodput: the highest rate with attainment >= 90%, interpolated between the last
    rate that meets it and the first that does not (rates ascending)."""
    points = sorted((float(r), s["attainment"]) for r, s in by_rate.items())
    if len(points) < 2:
        return {"goodput_rps": None, "note": "one rate: sweep --rates for goodput"}
    if points[0][1] < ATTAINMENT_FOR_GOODPUT:
        return {"goodput_rps": None, "note": f"below the lowest rate {points[0][0]:g}"}
    for (r0, a0), (r1, a1) in zip(points, points[1:]):
        if a1 < ATTAINMENT_FOR_GOODPUT:
            return {"goodput_rps": r0 + (r1 - r0) * (a0 - ATTAINMENT_FOR_GOODPUT) / (a0 - a1), "note": "interpolated"}
    return {"goodput_rps": points[-1][0], "note": "at least (every rate met it)"}


def measure_load(name: str, config: ClusterConfig, workload: list[dict], args: argparse.Namespace,
                 slo: dict) -> dict:
    print(f"[load] starting {name}", file=sys.stderr)
    server = start_server(config)
    by_rate = {}
    try:
        with GenerationClient(server.address) as client:
            warm = workload[: max(config.worker_counts().values())]
            for _ in range(2):  # every worker once (concurrent requests spread), and the transfer link
                run_load(client, [{**r, "arrival_unit_s": 0.0} for r in warm], 1.0)
            for rate in args.rates:
                records = run_load(client, workload, rate)
                by_rate[f"{rate:g}"] = {**summarize_load(records, workload, slo), "requests": records}
                s = by_rate[f"{rate:g}"]
                print(f"[load] {name} at {rate:g} req/s: attainment {s['attainment']:.0%}, "
                      f"failed {s['num_failed']}", file=sys.stderr)
    finally:
        stop_server(server)
    return {"config": dataclasses.asdict(config), "rates": by_rate, **goodput(by_rate)}


def load_agreement(systems: dict) -> dict:
    """Greedy outputs of each system against the first one's, request by request, per rate
    (batching changes fp32 reduction order, so a near-tie can flip; reported, not enforced)."""
    names = list(systems)
    ref = systems[names[0]]["rates"]
    return {name: {rate: output_agreement([r["token_ids"] for r in ref[rate]["requests"]],
                                          [r["token_ids"] for r in s["requests"]])
                   for rate, s in systems[name]["rates"].items()} for name in names[1:]}


def load_table(result: dict) -> str:
    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v * 1e3:.0f}"

    header = ["system", "rate req/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms", "E2E p50/p90 ms", "req/s",
              "out tok/s", "SLO attain.", "TTFT ok", "TPOT ok", "failed"]
    body = []
    for name, system in result["systems"].items():
        for rate, s in system["rates"].items():
            body.append([
                name, rate, "/".join(ms(s["ttft_s"][p]) for p in ("p50", "p90", "p99")),
                "/".join(ms(s["tpot_s"][p]) for p in ("p50", "p90", "p99")),
                "/".join(ms(s["e2e_s"][p]) for p in ("p50", "p90")), f"{s['throughput_rps']:.2f}",
                f"{s['output_tok_s']:.1f}", f"{s['attainment']:.0%}", f"{s['ttft_attainment']:.0%}",
                f"{s['tpot_attainment']:.0%}", str(s["num_failed"]),
            ])
    slo = result["slo"]
    lines = [f"SLO: TTFT <= {slo['ttft_s'] * 1e3:.0f} ms ({slo['ttft_source']}: {slo['isolated_prefill_s'] * 1e3:.0f} "
             f"ms for the median {slo['median_prompt_tokens']}-token prompt, 1 thread), TPOT <= "
             f"{slo['tpot_s'] * 1e3:.0f} ms ({slo['tpot_source']}: {slo['batch1_decode_step_s'] * 1e3:.1f} ms, "
             "1 thread)", "", markdown_table(header, body), ""]
    reference = next(iter(result["systems"]))
    for name, by_rate in result["agreement"].items():
        for rate, a in by_rate.items():
            lines.append(f"greedy outputs of {name} identical to {reference}'s at {rate} req/s: "
                         f"{a['identical_requests']}/{a['requests']}")
    for name, system in result["systems"].items():
        g = system["goodput_rps"]
        lines.append(f"goodput {name}: {'—' if g is None else f'{g:.2f} req/s'} ({system['note']})")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- main


def part_handoff(args: argparse.Namespace, engine: LLMEngine) -> dict:
    vocab = engine.model_config.vocab_size
    prompts = {n: random_prompts(1, n, n, vocab, seed=args.seed + n)[0] for n in args.prompt_lens}
    for prompt in prompts.values():
        local_prefill(engine, prompt)  # warm-up
    systems = {name: measure_handoff(name, config, engine, prompts, args.repeats)
               for name, config in handoff_systems(args).items()}
    return {"systems": systems, "summary": handoff_rows(systems)}


def part_load(args: argparse.Namespace, engine: LLMEngine) -> dict:
    workload = load_workload(args, engine)
    slo = slo_profile(engine, workload, args)
    systems = {name: measure_load(name, config, workload, args, slo) for name, config in load_systems().items()}
    return {
        "slo": slo,
        "workload": [{"arrival_unit_s": r["arrival_unit_s"], "prompt_tokens": len(r["prompt"]),
                      "max_tokens": r["max_tokens"]} for r in workload],
        "systems": systems, "agreement": load_agreement(systems),
    }


def main() -> None:
    args = parse_args()
    machine = prepare_machine(1)  # the in-process engine: 1 thread, like each 1-thread worker
    loaded = LoadedModel.load(ENGINE)
    engine = LLMEngine(ENGINE, loaded=loaded)
    result: dict = {
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
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
