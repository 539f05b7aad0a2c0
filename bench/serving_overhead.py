"""Serving overhead: the CPU time a request costs outside the engines, by component.

On a 2-core machine every CPU second the router, the front ends, Ray or the store spend is a
second the engines do not get. Each deployment (in-process ``Server``, bench/servers.py; one at
a time, in rounds with the order rotated) serves the same seeded load, sent by ``splitserve
loadtest run`` in a subprocess so the load generator's own CPU stays out. Around each run it
reads the CPU seconds of:

- engines: every worker's engine thread (``Worker.cpu_times()["engine"]``: steps and the
  calls between them);
- workers outside the engine: the rest of each worker process (its event loop, Ray's
  streaming generators, KV transfer threads, heartbeats);
- router + front ends: this process (the gRPC server, the Router, its Ray calls; nothing else
  runs here during a load);
- store: the metadata actor's process (the embedded store);
- Ray: raylet, GCS and Ray's other processes under this one.

It reports, per request, the CPU milliseconds in each, and the share outside the engines
(1 - engines / total), with min-max over rounds. JSON to --out, a table on stdout.

    python -m bench.serving_overhead --rounds 3 --num-requests 40 --rate 1.0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import ray

from bench.common import RESULTS_DIR, ROOT, command_line, git_revision, machine_info, markdown_table, slug
from bench.servers import ENGINE, start_server, stop_server
from splitserve.cluster import RAY_NAMESPACE
from splitserve.config import ClusterConfig

SYSTEMS = {
    "elastic 2": ClusterConfig(mode="elastic", num_workers=2, num_threads=1, engine=ENGINE),
    "disaggregated 1P+1D": ClusterConfig(mode="disaggregated", num_threads=1, engine=ENGINE),
    "colocated 2x1": ClusterConfig(mode="colocated", num_workers=2, num_threads=1, engine=ENGINE),
}
PARTS = ("engines", "workers outside the engine", "router + front ends", "store", "ray")


def cpu_seconds(workers: list, exclude: set[int]) -> dict[str, float]:
    """CPU seconds so far of this process and its descendants (but ``exclude`` and theirs), by
    part; the engine threads' from the ``workers`` (actor handles) themselves."""
    parts = dict.fromkeys(PARTS, 0.0)
    me = psutil.Process()
    times = me.cpu_times()
    parts["router + front ends"] = times.user + times.system
    for proc in me.children(recursive=True):
        try:
            if proc.pid in exclude or proc.ppid() in exclude:
                continue
            title = " ".join(proc.cmdline())
            times = proc.cpu_times()
        except psutil.Error:  # gone meanwhile
            continue
        part = "workers outside the engine" if "WorkerActor" in title else "store" if "MetadataActor" in title \
            else "ray"
        parts[part] += times.user + times.system
    engines = sum(record["engine"] for record in ray.get([w.cpu_times.remote() for w in workers]))
    parts["engines"] = engines
    parts["workers outside the engine"] -= engines
    return parts


def measure(name: str, config: ClusterConfig, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One load on a fresh deployment: CPU seconds per part over the load."""
    server = start_server(config)
    try:
        workers = list(server.deployment.handles.values())
        command = [str(Path(sys.executable).with_name("splitserve")), "loadtest", "run",
                   "--target", f"grpc://{server.address}", "--workload", "chat", "--scale", str(args.scale),
                   "--rate", str(args.rate),
                   "--num-requests", str(args.num_requests), "--seed", str(args.seed), "--out", str(out),
                   "--no-progress"]
        loadtest = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        before = cpu_seconds(workers, {loadtest.pid})
        _, stderr = loadtest.communicate()
        after = cpu_seconds(workers, {loadtest.pid})
        if loadtest.returncode != 0:
            raise RuntimeError(f"the load test against {name} failed: {stderr.strip()[-500:]}")
    finally:
        stop_server(server)
    return {part: after[part] - before[part] for part in PARTS}


def per_request(cpu_s: dict[str, float], num_requests: int) -> dict[str, float]:
    """CPU ms per request by part, the total, and the share outside the engines."""
    ms = {part: 1000 * seconds / num_requests for part, seconds in cpu_s.items()}
    total = sum(ms.values())
    return ms | {"total": total, "outside_share": 1 - ms["engines"] / total if total else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated systems to measure")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the system order rotated each round")
    parser.add_argument("--num-requests", type=int, default=40, help="requests per load")
    parser.add_argument("--rate", type=float, default=1.0, help="Poisson arrival rate (requests/s)")
    parser.add_argument("--scale", type=float, default=0.125, help="chat workload length scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the requests and arrivals")
    parser.add_argument("--stream-interval", type=int, default=1, help="the deployments' --stream-interval")
    parser.add_argument("--label", default="", help="a name for this measurement in the JSON (e.g. before)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serving_overhead.json",
                        help="JSON file to write (runs with another --label are kept)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {sorted(SYSTEMS)}")
    ray.init(num_cpus=2, include_dashboard=False, namespace=RAY_NAMESPACE)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                config = dataclasses.replace(SYSTEMS[name], stream_interval=args.stream_interval)
                run = measure(name, config, args, Path(tmp) / f"{round_index}-{slug(name)}")
                runs[name].append(per_request(run, args.num_requests))
                print(f"round {round_index + 1} {name}: {runs[name][-1]['total']:.1f} CPU ms/request, "
                      f"{100 * runs[name][-1]['outside_share']:.1f}% outside the engines", flush=True)
    ray.shutdown()
    result = {"command": command_line(), "revision": git_revision(ROOT), "machine": machine_info(),
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "systems": {name: summarize(runs[name]) for name in names}}
    kept = json.loads(args.out.read_text()) if args.out.is_file() else {}
    kept[args.label or "latest"] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(kept, indent=1) + "\n")
    print(table(result["systems"]))
    return 0


def summarize(rounds: list[dict]) -> dict:
    keys = [*PARTS, "total", "outside_share"]
    return {"rounds": rounds, "median": {k: statistics.median(r[k] for r in rounds) for k in keys},
            "min": {k: min(r[k] for r in rounds) for k in keys}, "max": {k: max(r[k] for r in rounds) for k in keys}}


def table(systems: dict) -> str:
    header = ["system", *(f"{p} ms" for p in PARTS), "total ms", "outside engines"]
    rows = [[name, *(f"{s['median'][p]:.1f}" for p in PARTS), f"{s['median']['total']:.1f}",
             f"{100 * s['median']['outside_share']:.1f}% ({100 * s['min']['outside_share']:.1f}-"
             f"{100 * s['max']['outside_share']:.1f})"] for name, s in systems.items()]
    return "CPU per request (median over rounds)\n" + markdown_table(header, rows)


if __name__ == "__main__":
    sys.exit(main())
