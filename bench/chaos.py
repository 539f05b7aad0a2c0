"""Chaos soak: serve a mixed load for a long run while workers, Redis and a router replica fail,
then show that nothing was lost, hung or leaked, and how memory moved.

    python -m bench.chaos                      # 30 minutes, a fault every 60 s
    python -m bench.chaos --minutes 5 --fault-every 30 --overload-minutes 0.5   # what CI runs

The cluster is real and all on this machine: a redis-server of its own (no persistence), a local
Ray, an elastic deployment of two workers with its router in this process (``Server``, workers
restarted when they die), and a router replica in its own process (``splitserve serve
--router-only``) on the same Redis and Ray. Both routers bound their wait queue
(``--max-queued-requests``). Load: Poisson arrivals at ``--rate``, and at ``--overload-rate``
during the overload window in the middle of the run (no fault is injected there; the report
gives the offered rate as a multiple of what the cluster served in it), alternating between
the two routers; prompts of 16-400 tokens, half of them behind one of four shared prefixes (prefix
reuse), 8-64 new tokens with ``ignore_eos`` (so a short stream is a truncated one), 10% of the
streams cancelled by their client after a few tokens.

Faults, in turn (``--faults`` picks the kinds), every ``--fault-every`` seconds: SIGKILL of the worker running the most
requests (its streams migrate; the deployment starts a new one), Redis frozen with SIGSTOP for
10 s (then SIGCONT), SIGKILL of the router replica (a new one is started at once, as a
supervisor would). Recovery time: from the end of the fault (the kill; the SIGCONT) until the
cluster is whole again (every worker listed by the head router and ready, the replica serving).

Every request ends in one outcome: ok; cancelled (by its client, on purpose); refused
(RESOURCE_EXHAUSTED); failed with an allowed status (UNAVAILABLE, DEADLINE_EXCEEDED,
CANCELLED); failed with another status (UNKNOWN, INTERNAL, ...: a defect); lost (a stream that
ended without an error but short of its tokens); hung (no end within ``--request-timeout``).
After the load stops the routers must drain and every worker must end idle (free blocks ==
total, nothing unfinished). Memory: the RSS of every process (this one: the head router and
the load; each worker process; the replica; redis-server, and Redis' own ``used_memory``)
sampled every 10 s; slopes by least squares in MiB/min over samples of one process life (a
restarted worker is a new series), over the second half of each life and never its first
``WARM_UP_S`` (caches and the allocator fill while new batch shapes come; a life too short for
two minutes after that has no slope). Worker kills end
a worker's life every few minutes, so a run that measures the workers' memory leaves them out:
``--faults "redis stall,router kill"``.

Writes ``summary.json`` to ``--out`` (default bench/results/chaos) and the per-request records
and samples beside it under bench/runs/; prints a table. Exit status 1 when a request was lost,
hung or failed with a status outside the allowed ones, or a block leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import psutil
import ray
import redis
from grpc_health.v1 import health_pb2

from bench.common import RESULTS_DIR, ROOT, command_line, git_revision, machine_info, markdown_table, raw_dir
from splitserve.cluster import RAY_NAMESPACE
from splitserve.config import ClusterConfig, ServeConfig, StoreConfig
from splitserve.protos.splitserve.v1 import serving_pb2_grpc as pb_grpc
from splitserve.router.client import GenerationClient, make_request
from splitserve.server import Server

ALLOWED = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}  # besides ok, cancelled by us, refused
FAULTS = ("worker kill", "redis stall", "router kill")
REDIS_STALL_S = 10.0
SAMPLE_S = 10.0
MAX_QUEUED = 8
VOCAB = 49152  # SmolLM2's; ids below it, above the special tokens
READY_TIMEOUT_S = 600.0
WARM_UP_S = 300.0


# ------------------------------------------------------------------------------- the cluster

class RedisServer:
    """A redis-server of this run's own: no persistence, its files in a temporary folder."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("bench.chaos needs redis-server (Debian: apt-get install redis-server)")
        self.dir = Path(tempfile.mkdtemp(prefix="chaos-redis-"))
        port = _free_port()
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir",
             str(self.dir), "--logfile", str(self.dir / "redis.log")], stdout=subprocess.DEVNULL)
        self.client = redis.Redis.from_url(self.url, socket_timeout=2.0, socket_connect_timeout=2.0)
        _until(lambda: _quietly(self.client.ping), 15, "redis-server did not start")

    def used_memory_mib(self) -> float | None:
        info = _quietly(self.client.info, "memory")
        return info["used_memory"] / 2**20 if info else None

    def num_keys(self, prefix: str) -> int:
        return sum(1 for _ in self.client.scan_iter(f"{prefix}*", count=1000))

    def stop(self) -> None:
        self.client.close()
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class RouterReplica:
    """``splitserve serve --router-only`` in its own process, on the head's Redis and Ray."""

    def __init__(self, redis_url: str, prefix: str, log: Path):
        self.redis_url, self.prefix, self.log = redis_url, prefix, log
        self.port = _free_port()
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "splitserve.cli", "serve", "--router-only", "--grpc-port", str(self.port),
                 "--redis-url", self.redis_url, "--store-prefix", self.prefix, "--mode", "elastic",
                 "--address", ray.get_runtime_context().gcs_address, "--max-queued-requests", str(MAX_QUEUED)],
                stdout=log, stderr=subprocess.STDOUT)

    def is_serving(self) -> bool:
        with GenerationClient(self.address) as client:
            return _quietly(client.health, timeout_s=1.0) == health_pb2.HealthCheckResponse.SERVING

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class Cluster:
    def __init__(self, raw: Path):
        self.redis = RedisServer()
        self.prefix = f"chaos-{uuid.uuid4().hex[:8]}"
        ray.init(num_cpus=os.cpu_count(), namespace=RAY_NAMESPACE, include_dashboard=False, log_to_driver=False)
        config = ClusterConfig(mode="elastic", num_workers=2,
                               store=StoreConfig(redis_url=self.redis.url, prefix=self.prefix))
        self.server = Server(config, ServeConfig(grpc_port=0, grace_s=5.0, max_queued_requests=MAX_QUEUED)).start()
        with GenerationClient(self.server.address) as client:
            client.wait_ready(READY_TIMEOUT_S)
        self.replica = RouterReplica(self.redis.url, self.prefix, raw / "replica.log")
        self.replica.start()
        _until(self.replica.is_serving, READY_TIMEOUT_S, "the router replica did not start")

    @property
    def addresses(self) -> list[str]:
        return [self.server.address, self.replica.address]

    def worker_pids(self) -> dict[str, int]:
        pids = {}
        for worker_id, handle in list(self.server.deployment.handles.items()):
            pid = _quietly(ray.get, handle.__ray_call__.remote(lambda actor: os.getpid()), timeout=10)
            if pid is not None:
                pids[worker_id] = pid
        return pids

    def is_whole(self) -> bool:
        """Every worker listed by the head router and answering, and the replica serving."""
        async def listed() -> set[str]:
            await self.server.router.refresh(force=True)
            return {w.worker_id for w in self.server.router.view.workers}

        workers = set(self.server.deployment.handles)
        return bool(_quietly(self.server.call, listed()) == workers and self.server.router.is_ready()
                    and len(self.worker_pids()) == len(workers) and self.replica.is_serving())

    def stop(self) -> None:
        self.replica.stop()
        self.server.stop()
        ray.shutdown()
        self.redis.stop()


# ------------------------------------------------------------------------------------ load

@dataclass
class Record:
    """One request: when it went where, what it asked for and how it ended."""

    index: int
    router: int
    sent_s: float
    max_tokens: int
    cancel_after: int | None
    outcome: str = ""  # ok, cancelled, refused, failed, lost, hung
    status: str = ""  # the gRPC status of a failure or refusal
    detail: str = ""  # and its sentence
    tokens: int = 0
    seconds: float = 0.0
    migrations: int = 0
    request_id: str = ""  # the router's id for it (its first message names it), to find it in the logs
    last_token_s: float | None = None  # seconds after sending when its last tokens came (a stall's start)


@dataclass
class Workload:
    seed: int
    prefixes: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.prefixes = [self._tokens(self.rng.randint(64, 192)) for _ in range(4)]

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(1000, VOCAB) for _ in range(n)]

    def next(self) -> tuple[list[int], int, int | None]:
        """(prompt token ids, max_tokens, cancel after this many tokens or None)."""
        suffix = self._tokens(self.rng.randint(16, 208))
        prompt = (self.rng.choice(self.prefixes) + suffix) if self.rng.random() < 0.5 else suffix
        cancel = self.rng.randint(2, 6) if self.rng.random() < 0.1 else None
        return prompt, self.rng.randint(8, 64), cancel


async def run_request(stub, record: Record, prompt: list[int], timeout_s: float, clock) -> None:
    request = make_request(prompt_token_ids=prompt, max_tokens=record.max_tokens, ignore_eos=True, temperature=0.0)
    call = stub.Generate(request, timeout=timeout_s)
    last = None
    try:
        async for response in call:
            record.tokens += len(response.token_ids)
            record.request_id = record.request_id or response.request_id
            if response.token_ids:
                record.last_token_s = clock() - record.sent_s
            last = response
            if record.cancel_after is not None and record.tokens >= record.cancel_after:
                call.cancel()
                record.outcome = "cancelled"
                break
    except grpc.aio.AioRpcError as e:
        code = e.code().name
        record.status, record.detail = code, (e.details() or "")[:300]
        if code == "DEADLINE_EXCEEDED" and clock() - record.sent_s >= timeout_s - 1:
            record.outcome = "hung"  # our own deadline: the server never ended the stream
        elif code == "RESOURCE_EXHAUSTED":
            record.outcome = "refused"
        else:
            record.outcome = "failed"
    except asyncio.CancelledError:
        record.outcome = record.outcome or "cancelled"
    if not record.outcome:
        record.outcome = "ok" if record.tokens == record.max_tokens else "lost"
    if last is not None and last.HasField("report"):
        record.migrations = last.report.migrations
    record.seconds = clock() - record.sent_s


# -------------------------------------------------------------------------------- the soak

@dataclass
class Fault:
    kind: str
    at_s: float
    ended_s: float = 0.0
    recovered_s: float | None = None  # from the end of the fault to a whole cluster
    detail: str = ""


class Soak:
    def __init__(self, cluster: Cluster, args: argparse.Namespace):
        self.cluster, self.args = cluster, args
        self.start = time.monotonic()
        self.records: list[Record] = []
        self.faults: list[Fault] = []
        self.samples: dict[str, list[tuple[float, float]]] = {}  # series -> (t, MiB)
        self.duration_s = args.minutes * 60
        middle = self.duration_s / 2
        self.overload = (middle - args.overload_minutes * 30, middle + args.overload_minutes * 30)

    def clock(self) -> float:
        return time.monotonic() - self.start

    async def run(self) -> None:
        faults, sampling = asyncio.create_task(self._faults()), asyncio.create_task(self._sample())
        await self._load()
        await faults  # a fault still healing is waited for: its recovery counts
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)

    async def _load(self) -> None:
        workload, arrivals = Workload(self.args.seed), random.Random(self.args.seed + 1)
        channels = [grpc.aio.insecure_channel(address) for address in self.cluster.addresses]
        stubs = [pb_grpc.GenerationStub(channel) for channel in channels]
        pending: set[asyncio.Task] = set()
        index = 0
        while (now := self.clock()) < self.duration_s:
            rate = self.args.overload_rate if self.overload[0] <= now < self.overload[1] else self.args.rate
            await asyncio.sleep(arrivals.expovariate(rate))
            prompt, max_tokens, cancel = workload.next()
            record = Record(index, index % 2, self.clock(), max_tokens, cancel)
            self.records.append(record)
            task = asyncio.create_task(run_request(stubs[record.router], record, prompt,
                                                   self.args.request_timeout, self.clock))
            pending.add(task)
            task.add_done_callback(pending.discard)
            index += 1
        if pending:
            await asyncio.wait(pending)
        for channel in channels:
            await channel.close()

    async def _faults(self) -> None:
        n = 0
        while (n := n + 1) * self.args.fault_every < self.duration_s - 15:
            await asyncio.sleep(max(0.0, n * self.args.fault_every - self.clock()))
            at = self.clock()
            if self.overload[0] - 15 <= at < self.overload[1]:
                continue  # the overload window is measured on its own
            fault = Fault(self.args.faults[len(self.faults) % len(self.args.faults)], at)
            try:
                await asyncio.to_thread(self._inject, fault)
            except Exception as e:  # e.g. the victim died another way a moment ago: no fault this time
                print(f"  {at:6.0f} s  {fault.kind:<12} not injected: {e!r}", flush=True)
                continue
            self.faults.append(fault)
            fault.ended_s = self.clock()
            if await asyncio.to_thread(_until, self.cluster.is_whole, 300, None):
                fault.recovered_s = self.clock() - fault.ended_s
            print(f"  {fault.at_s:6.0f} s  {fault.kind:<12} {fault.detail:<40} whole again after "
                  f"{_seconds(fault.recovered_s)}", flush=True)

    def _inject(self, fault: Fault) -> None:
        cluster = self.cluster
        if fault.kind == "worker kill":
            statuses = cluster.server.call(cluster.server.deployment.worker_statuses())
            victim = max(statuses, key=lambda w: statuses[w].num_unfinished)
            pid = cluster.worker_pids()[victim]
            os.kill(pid, signal.SIGKILL)
            fault.detail = f"{victim} (pid {pid}, {statuses[victim].num_unfinished} requests)"
        elif fault.kind == "redis stall":
            cluster.redis.process.send_signal(signal.SIGSTOP)
            time.sleep(REDIS_STALL_S)
            cluster.redis.process.send_signal(signal.SIGCONT)
            fault.detail = f"SIGSTOP for {REDIS_STALL_S:g} s"
        else:
            fault.detail = f"replica pid {cluster.replica.process.pid}"
            cluster.replica.kill()
            cluster.replica.start()

    async def _sample(self) -> None:
        while True:
            await asyncio.to_thread(self._sample_once)
            await asyncio.sleep(SAMPLE_S)

    def _sample_once(self) -> None:
        t, cluster = self.clock(), self.cluster
        processes = {"head router + load": os.getpid(), "redis-server": cluster.redis.process.pid}
        if cluster.replica.process is not None:
            processes["router replica"] = cluster.replica.process.pid
        processes |= {f"worker {w.rsplit('.', 1)[-1]}": pid for w, pid in cluster.worker_pids().items()}
        for name, pid in processes.items():
            rss = _quietly(lambda pid=pid: psutil.Process(pid).memory_info().rss)
            if rss is not None:
                self.samples.setdefault(f"{name} (pid {pid})", []).append((t, rss / 2**20))
        used = cluster.redis.used_memory_mib()
        if used is not None:
            self.samples.setdefault("redis used_memory", []).append((t, used))


# ----------------------------------------------------------------------------- the verdict

def drain_and_check(cluster: Cluster, timeout_s: float = 120.0) -> dict:
    """Wait until every worker is idle and the head router holds nothing; what is left."""
    server = cluster.server
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = server.call(server.deployment.worker_statuses())
        leaked = sum(s.num_total_blocks - s.num_free_blocks for s in statuses.values())
        unfinished = sum(s.num_unfinished for s in statuses.values())
        inflight = sum(server.router.view.inflight.values())
        if not (leaked or unfinished or inflight) or time.monotonic() > deadline:
            return {"leaked_blocks": leaked, "unfinished_requests": unfinished, "router_in_flight": inflight,
                    "workers": len(statuses)}
        time.sleep(0.2)


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float | None:
    """MiB/min by least squares over the second half of one process life, and never its first
    WARM_UP_S (caches and the allocator fill while new batch shapes come); None for a life too
    short to say."""
    first, last = samples[0][0], samples[-1][0]
    points = [(t, v) for t, v in samples if t >= first + max(WARM_UP_S, (last - first) / 2)]
    if len(points) < 5 or points[-1][0] - points[0][0] < 120:
        return None  # too short a life to say
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def fault_at(faults: list[Fault], t: float, slack_s: float = 5.0) -> str:
    """The kind of the fault under way at ``t``, from its start until it healed, or "no fault"; plus
    ``slack_s``, in which a gRPC client still waits out its reconnect backoff to a restarted replica."""
    for f in faults:
        if f.at_s <= t <= f.ended_s + (f.recovered_s if f.recovered_s is not None else math.inf) + slack_s:
            return f.kind
    return "no fault"


def summarize(soak: Soak, idle: dict, keys: dict, args: argparse.Namespace) -> dict:
    records = soak.records
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    failed_by_status: dict[str, int] = {}
    for r in records:
        if r.outcome in ("failed", "refused"):
            failed_by_status[r.status] = failed_by_status.get(r.status, 0) + 1
    failed_during = {kind: 0 for kind in (*args.faults, "no fault")}
    for r in records:
        if r.outcome == "failed":
            failed_during[fault_at(soak.faults, r.sent_s + r.seconds)] += 1
    disallowed = sum(n for status, n in failed_by_status.items() if status not in ALLOWED | {"RESOURCE_EXHAUSTED"})
    refusals = sorted(r.seconds for r in records if r.outcome == "refused")
    recovery: dict[str, dict] = {}
    for kind in args.faults:
        times = sorted(f.recovered_s for f in soak.faults if f.kind == kind and f.recovered_s is not None)
        recovery[kind] = {"faults": sum(f.kind == kind for f in soak.faults),
                          "not_recovered": sum(f.kind == kind and f.recovered_s is None for f in soak.faults),
                          "p50_s": _quantile(times, 0.5), "p99_s": _quantile(times, 0.99)}
    slopes = {name: slope_mib_per_min(series) for name, series in soak.samples.items()}
    in_window = [r for r in records if soak.overload[0] <= r.sent_s < soak.overload[1]]
    normal = [r for r in records if not soak.overload[0] <= r.sent_s < soak.overload[1]]
    phases = {name: {"requests": len(rs), "offered_per_s": len(rs) / span if span else 0.0,
                     "ok_per_s": sum(r.outcome == "ok" for r in rs) / span if span else 0.0,
                     "refused": sum(r.outcome == "refused" for r in rs)}
              for name, rs, span in (("normal", normal, soak.duration_s - (soak.overload[1] - soak.overload[0])),
                                     ("overload", in_window, soak.overload[1] - soak.overload[0]))}
    for phase in phases.values():
        phase["offered_over_served"] = phase["offered_per_s"] / phase["ok_per_s"] if phase["ok_per_s"] else None
    verdict = {"lost": outcomes.get("lost", 0), "hung": outcomes.get("hung", 0),
               "disallowed_statuses": disallowed, "leaked_blocks": idle["leaked_blocks"],
               "unfinished_at_end": idle["unfinished_requests"], "router_in_flight_at_end": idle["router_in_flight"]}
    return {
        "benchmark": "chaos", "command": command_line(), "revision": git_revision(ROOT),
        "machine": machine_info(),
        "setup": {"minutes": args.minutes, "faults": list(args.faults), "fault_every_s": args.fault_every,
                  "rate_per_s": args.rate, "warm_up_s": WARM_UP_S,
                  "overload_rate_per_s": args.overload_rate,
                  "overload_window_s": list(soak.overload), "request_timeout_s": args.request_timeout,
                  "max_queued_requests_per_router": MAX_QUEUED, "workers": 2, "routers": 2, "seed": args.seed},
        "requests": len(records), "outcomes": outcomes, "failed_by_status": failed_by_status,
        "failed_during": failed_during,
        "migrated": sum(r.migrations > 0 for r in records), "phases": phases,
        "refusal_latency_s": {"p50": _quantile(refusals, 0.5), "p99": _quantile(refusals, 0.99)},
        "faults": [asdict(f) for f in soak.faults], "recovery": recovery,
        "worker_restarts": soak.cluster.server.deployment.num_restarts,
        "rss_slope_mib_per_min": slopes,
        "rss_mib_first_last": {name: [round(series[0][1], 1), round(series[-1][1], 1)]
                               for name, series in soak.samples.items()},
        "store_keys": keys, "idle_at_end": idle, "verdict": verdict,
        "failing_requests": [asdict(r) for r in records if r.outcome in ("lost", "hung") or (
            r.outcome in ("failed", "refused") and r.status not in ALLOWED | {"RESOURCE_EXHAUSTED"})],
        "passed": not any(verdict.values()),
    }


def print_summary(summary: dict) -> None:
    print()
    outcomes = summary["outcomes"]
    print(markdown_table(["requests", *sorted(outcomes), "migrated", "refusal p50/p99"], [[
        str(summary["requests"]), *(str(outcomes[k]) for k in sorted(outcomes)), str(summary["migrated"]),
        f"{_seconds(summary['refusal_latency_s']['p50'])} / {_seconds(summary['refusal_latency_s']['p99'])}"]]))
    print()
    print(markdown_table(["failed during", *summary["failed_during"]],
                         [["requests", *(str(n) for n in summary["failed_during"].values())]]))
    print()
    print(markdown_table(["phase", "requests", "offered/s", "ok/s", "offered / served", "refused"], [
        [name, str(p["requests"]), f"{p['offered_per_s']:.2f}", f"{p['ok_per_s']:.2f}",
         "-" if p["offered_over_served"] is None else f"{p['offered_over_served']:.1f}x", str(p["refused"])]
        for name, p in summary["phases"].items()]))
    print()
    print(markdown_table(["fault", "times", "not recovered", "recovery p50", "recovery p99"], [
        [kind, str(r["faults"]), str(r["not_recovered"]), _seconds(r["p50_s"]), _seconds(r["p99_s"])]
        for kind, r in summary["recovery"].items()]))
    print()
    print(markdown_table(["process", "RSS slope over the second half of its life (MiB/min)"], [
        [name, "too short" if slope is None else f"{slope:+.2f}"]
        for name, slope in sorted(summary["rss_slope_mib_per_min"].items())]))
    print()
    print("failed or refused by status:", ", ".join(f"{status} {n}" for status, n in
                                                    sorted(summary["failed_by_status"].items())) or "none")
    for r in summary["failing_requests"]:
        last = "no token" if r["last_token_s"] is None else f"last token at +{r['last_token_s']:.1f} s"
        status = f", {r['status']}: {r['detail']}" if r["status"] else ""
        print(f"{r['outcome']}: request {r['request_id'] or '?'} (#{r['index']}, router {r['router']}) sent at "
              f"{r['sent_s']:.1f} s, {r['tokens']}/{r['max_tokens']} tokens, {last}{status}")
    print()
    print("verdict:", ", ".join(f"{k} {v}" for k, v in summary["verdict"].items()),
          "->", "passed" if summary["passed"] else "FAILED")


# ----------------------------------------------------------------------------------- helpers

def _fault_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(kind.strip() for kind in text.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in FAULTS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(f"fault kinds are {', '.join(FAULTS)}; got {text!r}")
    return kinds


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _quietly(function, *args, **kwargs):
    """``function(...)``, or None when it raised (a process that died, a frozen Redis)."""
    try:
        return function(*args, **kwargs)
    except Exception:
        return None


def _until(condition, timeout_s: float, error: str | None) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            if error is not None:
                raise RuntimeError(error)
            return False
        time.sleep(0.1)
    return True


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the load (default: %(default)s)")
    parser.add_argument("--fault-every", type=float, default=60.0, metavar="S",
                        help="seconds between faults (default: %(default)s)")
    parser.add_argument("--faults", type=_fault_kinds, default=FAULTS, metavar="KINDS",
                        help=f"comma-separated fault kinds injected in turn, from: {', '.join(FAULTS)} (default: "
                        "all of them)")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second outside the overload window "
                        "(default: %(default)s)")
    parser.add_argument("--overload-rate", type=float, default=12.0, metavar="RATE",
                        help="requests per second in the overload window: about 3x what the cluster serves here "
                        "(default: %(default)s)")
    parser.add_argument("--overload-minutes", type=float, default=2.0, metavar="M",
                        help="minutes at --overload-rate in the middle of the run, with no fault (default: "
                        "%(default)s)")
    parser.add_argument("--request-timeout", type=float, default=300.0, metavar="S",
                        help="a request with no end after this long counts as hung (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "chaos",
                        help="folder for summary.json (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (args.minutes > 0 and args.fault_every > 0 and args.rate > 0 and args.overload_rate > 0
            and 0 <= args.overload_minutes
            and args.overload_minutes * 60 < args.minutes * 60 and args.request_timeout > 0):
        parser.error("need positive --minutes, --fault-every, --rate, --overload-rate and --request-timeout, and "
                     "an overload window shorter than the run")
    raw = raw_dir(args.out)
    raw.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"starting the cluster (logs in {raw})", flush=True)
    cluster = Cluster(raw)
    try:
        keys_before = cluster.redis.num_keys(cluster.prefix)
        soak = Soak(cluster, args)
        print(f"load for {args.minutes:g} min at {args.rate:g} req/s ({args.overload_rate:g} from "
              f"{soak.overload[0]:.0f} s to {soak.overload[1]:.0f} s), a fault every {args.fault_every:g} s",
              flush=True)
        asyncio.run(soak.run())
        idle = drain_and_check(cluster)
        keys = {"before": keys_before, "after": cluster.redis.num_keys(cluster.prefix)}
        summary = summarize(soak, idle, keys, args)
        with (raw / "records.jsonl").open("w") as f:
            f.writelines(json.dumps(asdict(r)) + "\n" for r in soak.records)
        (raw / "samples.json").write_text(json.dumps(soak.samples))
    finally:
        cluster.stop()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    print(f"\nwrote {args.out / 'summary.json'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
