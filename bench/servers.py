"""In-process splitserve servers for the benchmarks that measure through the real cluster.

One Ray per benchmark run (the caller's ``ray.init``); one ``Server`` (Ray actors, router,
gRPC front end on a free port) at a time, started by ``start_server`` and stopped by
``stop_server`` before the next starts, so each deployment has every CPU to itself.
"""

from __future__ import annotations

import time

import ray

from splitserve.config import ClusterConfig, EngineConfig, ServeConfig
from splitserve.router.client import GenerationClient
from splitserve.server import Server

READY_TIMEOUT_S = 60.0
# Prefix caching off in every benchmark engine: repeats and policies send the same prompts, and a
# cache hit would skip the prefill the benchmark means to cost.
ENGINE = EngineConfig(enable_prefix_caching=False)


def start_server(config: ClusterConfig) -> Server:
    """A started Server on a free gRPC port, its workers ready."""
    server = Server(config, ServeConfig(grpc_port=0, grace_s=5.0)).start()
    with GenerationClient(server.address) as client:
        client.wait_ready(READY_TIMEOUT_S)
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
