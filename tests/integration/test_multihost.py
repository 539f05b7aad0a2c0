"""A real multi-host Ray cluster on one machine: three hosts, each a network namespace with its
own address (tests/integration/netns.py) -- host a runs Redis, the Ray head (no CPUs for
workers) and `splitserve serve`; host b a Ray node offering the prefill pool's resource; host
c one offering the decode pool's, started only after serve, which waits for it. Ray runs with
token authentication. Requests cross hosts with both KV transfer backends and their greedy
output equals the offline engine's; each worker's KV endpoint is its own node's address
(--host auto) on the node its pool's resource pins it to; SIGTERM to serve drains an in-flight
request within the grace period; after host b's raylet is killed the router serves on c alone
and no request hangs.

Needs root (CI has it); skipped with the reason elsewhere. Cleans up only the processes inside
the namespaces it made, and those namespaces.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PROMPTS
from tests.integration.netns import Hosts, unavailable
from tests.integration.test_serving import MAX_TOKENS, expected  # noqa: F401  # the offline engine's outputs

REASON = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=f"multi-host tests: {REASON}")]

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
RAY_PORT, REDIS_PORT, GRPC_PORT = 6380, 6390, 50051
PREFILL, DECODE = {"splitserve_prefill": 1}, {"splitserve_decode": 1}
GRACE_S = 20


class Cluster:
    """The hosts, Redis, the Ray nodes and the serve processes of this module."""

    def __init__(self, hosts: Hosts, workdir: Path, ray_dir: Path):
        self.hosts, self.workdir = hosts, workdir
        self.ray_dir = ray_dir  # short: Ray's Unix socket paths under it must stay within 107 bytes
        self.head = hosts.address("a")
        # Every Ray process and client here authenticates with this token (Ray's own variables);
        # nothing of this process's Ray settings leaks in.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "PYTHONPATH": str(REPO),
            "RAY_USAGE_STATS_ENABLED": "0"}
        self.nodes: set[str] = set()
        password = secrets.token_hex(16)  # Redis refuses other hosts without one (protected mode)
        self.redis = hosts.popen("a", ["redis-server", "--bind", self.head, "--port", str(REDIS_PORT), "--save", "",
                                       "--appendonly", "no", "--dir", str(workdir), "--requirepass", password],
                                 self.env, log="redis.log")
        self.redis_url = f"redis://:{password}@{self.head}:{REDIS_PORT}/0"
        self.serves = 0

    def start_node(self, host: str, resources: dict[str, int] | None = None) -> None:
        """`ray start` on the host (the head on a), returning once its daemons run."""
        argv = [str(BIN / "ray"), "start", "--node-ip-address", self.hosts.address(host), "--disable-usage-stats",
                "--object-store-memory", str(100 * 2**20), "--temp-dir", str(self.ray_dir / host)]
        if host == "a":
            argv += ["--head", "--port", str(RAY_PORT), "--num-cpus", "0", "--include-dashboard", "false"]
        else:
            argv += ["--address", f"{self.head}:{RAY_PORT}", "--num-cpus", "1", "--resources", json.dumps(resources)]
        done = self.hosts.run(host, argv, self.env, timeout_s=180)
        assert done.returncode == 0, f"ray start on {host} failed:\n{done.stdout}\n{done.stderr}"
        self.nodes.add(host)

    def serve(self, mode: str, backend: str = "collective") -> tuple[subprocess.Popen, str]:
        """`splitserve serve` on host a over the cluster (returns at once); its log file."""
        self.serves += 1
        prefix, log = f"mh{self.serves}", f"serve-{self.serves}.log"
        workers = ["--prefill-workers", "1", "--decode-workers", "1"] if mode == "disaggregated" else \
            ["--workers", "2", "--prefill-workers", "1", "--no-balance-roles"]
        argv = [str(BIN / "splitserve"), "serve", "--address", f"{self.head}:{RAY_PORT}", "--mode", mode, *workers,
                "--threads-per-worker", "1", "--host", "auto", "--transfer", backend,
                "--prefill-resources", json.dumps(PREFILL), "--decode-resources", json.dumps(DECODE),
                "--redis-url", self.redis_url, "--store-prefix", prefix, "--grpc-host", self.head,
                "--grpc-port", str(GRPC_PORT), "--grace", str(GRACE_S), "--resource-wait", "300"]
        return self.hosts.popen("a", argv, self.env, log=log), log

    def probe(self, spec: dict) -> subprocess.Popen:
        """The client (multihost_probe) on host a; JSON lines on its stdout."""
        spec = {"grpc": f"{self.head}:{GRPC_PORT}", "max_tokens": MAX_TOKENS, **spec}
        argv = [sys.executable, "-m", "tests.integration.multihost_probe", json.dumps(spec)]
        return subprocess.Popen(self.hosts.command("a", argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO, env=self.env)

    def log(self, name: str) -> str:
        return (self.workdir / name).read_text(errors="replace")


def lines(probe: subprocess.Popen, timeout_s: float = 600) -> list[dict]:
    out, err = probe.communicate(timeout=timeout_s)
    assert probe.returncode == 0, f"the probe failed:\n{err[-3000:]}"
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def stop(serve: subprocess.Popen) -> float:
    """SIGTERM the serve process; the seconds it took to exit (it must exit 0)."""
    started = time.monotonic()
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(GRACE_S + 60) == 0
    return time.monotonic() - started


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("multihost")
    ray_dir = Path(tempfile.mkdtemp(prefix="ssmh-", dir="/tmp"))
    try:
        with Hosts(["a", "b", "c"], workdir) as hosts:
            c = Cluster(hosts, workdir, ray_dir)
            c.start_node("a")
            c.start_node("b", PREFILL)
            yield c
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.mark.parametrize("backend", ["collective", "grpc"])
def test_requests_cross_hosts_with_either_kv_transfer(cluster: Cluster, expected, backend: str):  # noqa: F811
    serve, log = cluster.serve("disaggregated", backend)
    if "c" not in cluster.nodes:
        # The decode pool's node has not joined: serve waits for it, and says so, instead of failing.
        deadline = time.monotonic() + 120
        while "waiting for" not in cluster.log(log) and time.monotonic() < deadline and serve.poll() is None:
            time.sleep(0.5)
        assert serve.poll() is None and "1 splitserve_decode (0 free)" in cluster.log(log)
        cluster.start_node("c", DECODE)
    records = lines(cluster.probe({"prompts": PROMPTS, "redis": cluster.redis_url, "prefix": f"mh{cluster.serves}"}))
    requests, workers = records[:-1], records[-1]["workers"]
    done = [r for r in requests if "tokens" in r]
    assert [r["tokens"] for r in done] == expected and all(r["error"] is None for r in done)
    assert {r["report"]["placement"] for r in done} == {"remote"}  # every KV crossed from b to c
    hosts = {w["kind"]: w["kv_endpoint"].rsplit(":", 1)[0] for w in workers.values()}
    assert hosts == {"prefill": cluster.hosts.address("b"), "decode": cluster.hosts.address("c")}
    stop(serve)


def test_sigterm_drains_an_in_flight_request_within_the_grace_period(cluster: Cluster):
    if "c" not in cluster.nodes:
        cluster.start_node("c", DECODE)
    serve, _ = cluster.serve("elastic")
    probe = cluster.probe({"prompts": [PROMPTS[2]], "max_tokens": 64, "ignore_eos": True})
    assert probe.stdout is not None
    first = probe.stdout.readline()  # the probe waits for readiness, then streams
    assert json.loads(first) == {"first_token": PROMPTS[2]}
    took = stop(serve)
    record = lines(probe)[0]
    assert record["error"] is None and len(record["tokens"]) == 64  # finished, not cut off
    assert took < GRACE_S + 30


def test_a_dead_node_is_routed_around_and_no_request_hangs(cluster: Cluster, expected):  # noqa: F811
    if "c" not in cluster.nodes:
        cluster.start_node("c", DECODE)
    serve, _ = cluster.serve("elastic")
    warm = lines(cluster.probe({"prompts": PROMPTS[:1]}))
    assert warm[-1]["error"] is None
    assert cluster.hosts.kill("b", "raylet")  # host b's node dies, and its worker with it
    # For a few seconds the router may still try b's worker; each such request must end with a
    # clear status, never hang; once b's membership lapses every request is served on c.
    records = [r for r in lines(cluster.probe({"prompts": PROMPTS[:2], "loop_s": 12})) if "tokens" in r]
    for r in records:
        assert r["error"] is None or (r["error"][0] in ("UNAVAILABLE", "RESOURCE_EXHAUSTED") and r["error"][1])
    served = [r for r in records if r["error"] is None]
    assert served and all(r["tokens"] == expected[PROMPTS.index(r["prompt"])] for r in served)
    on_c = f"mh{cluster.serves}.worker-1"  # the worker the decode pool's resource put on host c
    assert all(r["error"] is None and r["report"]["decode_worker"] == on_c for r in records[-4:])
    stop(serve)
