"""The servers bench.goodput measures: each a process tree started from its command line, ready
when GET /health answers 200, warmed up with three requests, stopped with SIGTERM to its process
group (SIGKILL after a grace period) and given a few seconds to free the cores before the next.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class System:
    """A server to measure: its command line, the HTTP port it serves /v1 on, extra environment."""

    name: str
    command: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    send_slo: bool = False  # the requests carry the SLO, so the router refuses what it predicts to miss

    @property
    def target(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def start(system: System, log_path: Path, timeout_s: float, log: Callable[[str], None] = print) -> subprocess.Popen:
    """The started, warmed-up server; RuntimeError (a sentence) when it cannot be started."""
    log(f"starting {system.name}: {' '.join(system.command)}")
    if not Path(system.command[0]).exists():
        raise RuntimeError(f"{system.command[0]} not found (for vLLM: ../shared/tools/vllm-cpu-venv DIR builds it)")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(system.command, env={**os.environ, **system.env}, stdout=log_path.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not ready(system):
        if proc.poll() is not None:
            raise RuntimeError(f"{system.name} exited with {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{system.name} not ready after {timeout_s:g} s; see {log_path}")
        time.sleep(1.0)
    try:
        warm_up(system)
    except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
        stop(proc)
        raise RuntimeError(f"{system.name} failed its warm-up requests ({e}); see {log_path}") from e
    log(f"{system.name} ready")
    return proc


def ready(system: System) -> bool:
    """Its readiness endpoint answers 200 (both servers' /health: splitserve's front ends listen
    before its workers are up, and say 503 until they are)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{system.port}/health", timeout=5) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def warm_up(system: System) -> None:
    """A few requests before measuring: first-call compilation and allocation stay out of it."""
    with urllib.request.urlopen(system.target + "/models", timeout=10) as reply:
        model = json.load(reply)["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": "Warm up: " * 40, "max_tokens": 16, "temperature": 0,
                       "ignore_eos": True}).encode()
    for _ in range(3):
        request = urllib.request.Request(system.target + "/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as reply:
            reply.read()


def stop(proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(5.0)  # the server's children (Ray workers, vLLM's engine core) let go of the cores
