"""`splitserve serve`: its flags (defaults read from the configuration dataclasses) and the
function that runs a Server in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from splitserve.config import (
    AUTO_HOST,
    KV_CODECS,
    MODES,
    PROPOSERS,
    TRANSFER_BACKENDS,
    AccessConfig,
    ClusterConfig,
    EngineConfig,
    PlacementConfig,
    RoleConfig,
    ServeConfig,
    SpeculativeConfig,
    StoreConfig,
    TransferConfig,
    field_default,
)
from splitserve.loadtest.arguments import sizes

API_KEY_ENV = "SPLITSERVE_API_KEY"
KV_AUTH_KEY_ENV = "SPLITSERVE_KV_AUTH_KEY"


def add_options(serve: argparse.ArgumentParser,
                add_model_options: Callable[[argparse._ActionsContainer], None]) -> None:
    """Every flag of `serve`, in groups; ``add_model_options``: the --model/--dtype/--quantization/
    --enforce-eager flags that `generate` shares."""
    _add_worker_options(serve.add_argument_group("workers"))
    _add_front_end_options(serve.add_argument_group("front ends"))
    engine = serve.add_argument_group("engine (every worker)")
    add_model_options(engine)
    _add_engine_options(engine)
    serve.set_defaults(run=run)


def configs(args: argparse.Namespace) -> tuple[ClusterConfig, ServeConfig]:
    """The configuration the flags describe; ValueError (a sentence) for a bad value."""
    engine = EngineConfig(model=args.model, dtype=args.dtype, quantization=args.quantization,
                          enforce_eager=args.enforce_eager, num_kv_blocks=args.num_kv_blocks,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          enable_prefix_caching=args.enable_prefix_caching)
    decode_engine = None
    if args.speculative:
        speculative = SpeculativeConfig(args.speculative, num_speculative_tokens=args.num_speculative_tokens)
        decode_engine = replace(engine, speculative=speculative)
    transfer = TransferConfig(backend=args.transfer, kv_codec=args.kv_codec, layers_per_chunk=args.layers_per_chunk,
                              host=args.host, auth_key=kv_auth_key(args.kv_auth_key_file))
    store = StoreConfig(redis_url=args.redis_url, prefix=args.store_prefix)
    cluster = ClusterConfig(mode=args.mode, num_workers=args.workers, num_prefill_workers=args.prefill_workers,
                            num_decode_workers=args.decode_workers,
                            engine=engine, decode_engine=decode_engine, transfer=transfer, store=store,
                            num_threads=args.threads_per_worker, cpus_per_worker=args.cpus_per_worker,
                            stream_interval=args.stream_interval,
                            release_memory_every_s=args.release_memory_every or None,
                            prefill_resources=args.prefill_resources, decode_resources=args.decode_resources,
                            resource_wait_s=args.resource_wait, restart_workers=args.restart_workers)
    serve = ServeConfig(grpc_host=args.grpc_host, grpc_port=args.grpc_port, http_host=args.http_host,
                        http_port=args.http_port, address=args.address, grace_s=args.grace,
                        slo_ttft_s=args.slo_ttft_ms / 1000 if args.slo_ttft_ms else None,
                        slo_tpot_s=args.slo_tpot_ms / 1000 if args.slo_tpot_ms else None,
                        router_only=args.router_only, migration_limit=args.migration_limit,
                        max_queued_requests=args.max_queued_requests, stream_lease_s=args.stream_lease,
                        stream_check_s=args.stream_check, send_timeout_s=args.send_timeout,
                        access=AccessConfig(api_keys=api_keys(args.api_key), ssl_certfile=args.ssl_certfile,
                                            ssl_keyfile=args.ssl_keyfile, ssl_ca_certs=args.ssl_ca_certs),
                        roles=RoleConfig(enabled=args.balance_roles, min_dwell_s=args.role_dwell),
                        placement=PlacementConfig(admission=args.admission, chunk_tokens=args.prefill_chunk_tokens))
    return cluster, serve


def api_keys(given: list[str] | None) -> tuple[str, ...]:
    """The API keys: those given with --api-key, else $SPLITSERVE_API_KEY's (comma-separated)."""
    if given:
        return tuple(given)
    return tuple(key.strip() for key in os.environ.get(API_KEY_ENV, "").split(",") if key.strip())


def kv_auth_key(path: str | None) -> bytes | None:
    """The KV links' shared secret: --kv-auth-key-file's content, else $SPLITSERVE_KV_AUTH_KEY's
    (surrounding whitespace dropped; None: neither). ValueError for a file it cannot read."""
    if path is None:
        key = os.environ.get(KV_AUTH_KEY_ENV, "").strip().encode()
        return key or None
    try:
        with open(path, "rb") as file:
            key = file.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read the KV auth key file {path}: {e.strerror}") from None
    if not key:
        raise ValueError(f"the KV auth key file {path} is empty")
    return key


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal
    import sys

    from splitserve.cluster.store import StoreConnectionError
    from splitserve.errors import CapacityError, ServingError
    from splitserve.server import Server, connect_ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cluster, options = configs(args)
        server = Server(cluster, options)
    except ValueError as error:
        print(f"splitserve: error: {error}", file=sys.stderr)
        return 2

    def ready(s: Server) -> None:
        role = ", router replica" if options.router_only else ""
        assert s.router is not None
        print(f"splitserve: serving {s.router.model_name} ({cluster.mode}{role}) on {s.address}", flush=True)
        if s.http_port is not None:
            print(f"splitserve: OpenAI-compatible API on http://{options.http_host}:{s.http_port}/v1", flush=True)

    connect_ray(options.address)  # first: it installs a SIGTERM handler that ours replaces

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_stop)
        await server.run(on_ready=ready)

    try:
        asyncio.run(main())
    except (ValueError, CapacityError, ServingError, StoreConnectionError) as error:  # start-up failed; workers stopped
        print(f"splitserve: error: {error}", file=sys.stderr)
        return 1
    print("splitserve: stopped", file=sys.stderr)
    return 0


def _option(group: argparse._ArgumentGroup, cls: type, flag: str, name: str, text: str, **kwargs: Any) -> None:
    group.add_argument(flag, default=field_default(cls, name), help=text, **kwargs)


def _add_worker_options(group: argparse._ArgumentGroup) -> None:
    _option(group, ClusterConfig, "--mode", "mode", "elastic: every worker can prefill and decode, and the router "
            "places each request's prefill on a prefill worker or locally on its decode worker by predicted latency; "
            "disaggregated: a fixed prefill/decode split, never a local prefill; colocated: every worker runs its "
            "requests end to end (default: %(default)s)", choices=MODES)
    _option(group, ClusterConfig, "--workers", "num_workers",
            "workers in elastic mode (default: 2) or colocated mode (default: 1)", type=int, metavar="N")
    _option(group, ClusterConfig, "--prefill-workers", "num_prefill_workers", "workers starting in the prefill pool "
            "(elastic; default: half of --workers, rounded down) or prefill workers (disaggregated; default: 1)",
            type=int, metavar="N")
    _option(group, ClusterConfig, "--decode-workers", "num_decode_workers", "workers starting in the decode pool "
            "(elastic; default: the rest of --workers) or decode workers (disaggregated; default: 1)",
            type=int, metavar="N")
    is_on = field_default(RoleConfig, "enabled")
    group.add_argument("--balance-roles", action=argparse.BooleanOptionalAction, default=is_on,
                       help="elastic: move workers between the prefill and decode pools as the measured work calls "
                       f"for it (default: {'on' if is_on else 'off'})")
    _option(group, RoleConfig, "--role-dwell", "min_dwell_s", "elastic: seconds between two pool moves "
            "(default: %(default)g)", type=float, metavar="SECONDS")
    _option(group, ClusterConfig, "--threads-per-worker", "num_threads",
            "torch threads (and Ray CPUs) per worker (default: the cluster's CPUs split evenly)", type=int, metavar="N")
    _option(group, ClusterConfig, "--cpus-per-worker", "cpus_per_worker",
            "Ray CPUs each worker asks for, a fraction allowed: 0.5 runs 4 workers on 2 cores (demos, tests; each "
            "still runs --threads-per-worker threads, default 1 here) (default: its thread count)", type=float,
            metavar="CPUS")
    _option(group, ClusterConfig, "--stream-interval", "stream_interval", "send a request's tokens from its "
            "worker in messages of at least N (the first and the last at once): fewer messages, less CPU taken from "
            "the engines, burstier streams (default: %(default)s)", type=int, metavar="N")
    _option(group, ClusterConfig, "--release-memory-every", "release_memory_every_s", "a worker that stepped "
            "since hands the heap memory its steps freed back to the OS at most every SECONDS (malloc_trim; a few ms "
            "on the engine thread), so its RSS falls after a burst; 0 never does (default: %(default)g)",
            type=float, metavar="SECONDS")
    _option(group, TransferConfig, "--host", "host", "the address workers reach each other at for KV transfer; "
            f"{AUTO_HOST!r}: each worker's own node address, for a cluster spanning hosts (default: %(default)s)")
    group.add_argument("--prefill-resources", type=_resources, default=field_default(ClusterConfig,
                       "prefill_resources"), metavar="JSON", help="Ray custom resources every worker starting in "
                       "the prefill pool requests, pinning the pool to the nodes that offer them, e.g. "
                       "'{\"splitserve_prefill\": 1}' (default: none)")
    group.add_argument("--decode-resources", type=_resources, default=field_default(ClusterConfig,
                       "decode_resources"), metavar="JSON", help="likewise for the decode pool (and colocated "
                       "workers) (default: none)")
    is_on = field_default(ClusterConfig, "restart_workers")
    group.add_argument("--restart-workers", action=argparse.BooleanOptionalAction, default=is_on,
                       help="replace a worker whose process died with a new one of the same name (it loads the "
                       "model and joins again); --no-restart-workers serves on with fewer (default: "
                       f"{'on' if is_on else 'off'})")
    _option(group, ClusterConfig, "--resource-wait", "resource_wait_s", "seconds to wait for the resources the "
            "workers need when joining a Ray cluster (its nodes may join later), logging progress; a cluster this "
            "command started fails at once on what it lacks (default: %(default)s)", type=float, metavar="SECONDS")
    _option(group, TransferConfig, "--transfer", "backend",
            "how prefill workers send the KV cache to decode workers (default: %(default)s)", choices=TRANSFER_BACKENDS)
    _option(group, TransferConfig, "--kv-codec", "kv_codec",
            "how KV values are encoded on the wire (default: %(default)s)", choices=KV_CODECS)
    _option(group, TransferConfig, "--layers-per-chunk", "layers_per_chunk", "layers per KV chunk on the wire; a "
            "chunk is sent as soon as its layers are computed (default: %(default)s)", type=int, metavar="N")
    group.add_argument("--kv-auth-key-file", metavar="FILE", help="a file holding the deployment's shared secret "
                       "for KV links (at least 16 bytes): workers refuse KV chunks and collective rendezvous from "
                       "peers without it; every process of the deployment needs the same one (default: "
                       f"${KV_AUTH_KEY_ENV}, else none)")
    _option(group, StoreConfig, "--redis-url", "redis_url",
            "keep the shared state (workers, loads, prefix index) in this Redis: redis://HOST:6379/0, or over TLS "
            "rediss://[USER:PASSWORD@]HOST:6379/0[?ssl_ca_certs=CA.pem] (an ACL user needs ~PREFIX:*) (default: an "
            "embedded store)",
            metavar="URL")
    _option(group, StoreConfig, "--store-prefix", "prefix",
            "namespace of this deployment's shared state and worker names (default: %(default)s)", metavar="PREFIX")


def _resources(text: str) -> dict[str, float]:
    """A --*-resources value: a JSON object of resource name -> amount."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of resource name -> amount, got {text!r}")
    return value


def _add_front_end_options(group: argparse._ArgumentGroup) -> None:
    _option(group, ServeConfig, "--address", "address",
            "join this Ray cluster: 'auto' or HOST:PORT (default: start a local one)")
    _option(group, ServeConfig, "--grpc-host", "grpc_host",
            "the address the gRPC API listens on (default: %(default)s)", metavar="HOST")
    _option(group, ServeConfig, "--grpc-port", "grpc_port",
            "the gRPC API's port; 0: a free one (default: %(default)s)", type=int, metavar="PORT")
    _option(group, ServeConfig, "--http-host", "http_host",
            "the address the HTTP API listens on (default: %(default)s)", metavar="HOST")
    _option(group, ServeConfig, "--http-port", "http_port", "also serve the OpenAI-compatible HTTP API "
            "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics) on this port; 0: a free one "
            "(default: no HTTP)", type=int, metavar="PORT")
    # ServeConfig holds seconds; these flags are in milliseconds (None either way: no target).
    group.add_argument("--slo-ttft-ms", type=float, default=None, metavar="MS", help="TTFT target for requests "
                       "that set none; a request predicted to miss it is refused (default: none)")
    group.add_argument("--slo-tpot-ms", type=float, default=None, metavar="MS",
                       help="TPOT target for requests that set none, likewise (default: none)")
    is_on = field_default(PlacementConfig, "admission")
    group.add_argument("--admission", action=argparse.BooleanOptionalAction, default=is_on,
                       help="refuse (RESOURCE_EXHAUSTED / 429) a request no placement is predicted to serve within its "
                       "SLO; --no-admission places it as well as it can, the SLOs still steering placement "
                       f"(default: {'on' if is_on else 'off'})")
    chunks = field_default(PlacementConfig, "chunk_tokens")
    group.add_argument("--prefill-chunk-tokens", type=sizes, default=chunks, metavar="SIZES",
                       help="elastic: the prefill chunk sizes a placement may use; of those whose steps keep the "
                       "running requests within their TPOT SLO, the one with the soonest first token wins (each "
                       f"step still holds at most --max-num-batched-tokens) (default: {','.join(map(str, chunks))})")
    _option(group, ServeConfig, "--grace", "grace_s",
            "seconds in-flight requests get to finish at shutdown (default: %(default)g)", type=float,
            metavar="SECONDS")
    group.add_argument("--api-key", action="append", metavar="KEY", help="callers of both APIs must send "
                       "'Authorization: Bearer KEY' (gRPC: authorization metadata); repeat for several keys; health "
                       f"and liveness stay open (default: ${API_KEY_ENV}, comma-separated, else none)")
    for flag, name, text in (("--ssl-certfile", "ssl_certfile", "PEM certificate chain: serve both APIs over TLS"),
                             ("--ssl-keyfile", "ssl_keyfile", "PEM private key of --ssl-certfile"),
                             ("--ssl-ca-certs", "ssl_ca_certs", "PEM CA bundle: require client certificates it "
                              "signed (mutual TLS)")):
        _option(group, AccessConfig, flag, name, f"{text} (default: none)", metavar="FILE")
    _option(group, ServeConfig, "--migration-limit", "migration_limit", "times a request may move to another "
            "worker, continuing from the tokens already streamed, when the worker running it dies; 0: never, it fails "
            "with UNAVAILABLE (default: %(default)s)", type=int, metavar="N")
    _option(group, ServeConfig, "--max-queued-requests", "max_queued_requests", "requests that may wait for their "
            "first token at once; one more is refused at once (RESOURCE_EXHAUSTED / 429 with a retry hint) instead "
            "of queueing (default: no bound)", type=int, metavar="N")
    _option(group, ServeConfig, "--stream-lease", "stream_lease_s", "seconds a worker keeps streaming a "
            "request without hearing from its router (renewed every third of it); a router that died has its "
            "requests aborted after this (default: %(default)s)", type=float, metavar="S")
    _option(group, ServeConfig, "--stream-check", "stream_check_s", "seconds a worker's stream may stay silent "
            "before the router asks the worker whether it still holds the request; a stream whose worker twice "
            "does not has lost its end, and the request continues on another worker (default: %(default)s)",
            type=float, metavar="S")
    _option(group, ServeConfig, "--send-timeout", "send_timeout_s", "seconds a stream may wait on a client that "
            "takes no data (it stopped reading) before its request is aborted and the stream ended (default: "
            "%(default)s)", type=float, metavar="S")
    _option(group, ServeConfig, "--router-only", "router_only", "a router replica: start no workers, serve over "
            "those another `splitserve serve` started (same --redis-url, --store-prefix, --mode and --model; join "
            "its Ray with --address); worker options are ignored", action="store_true")


def _add_engine_options(group: argparse._ArgumentGroup) -> None:
    kv_gib = field_default(EngineConfig, "kv_cache_bytes") / 2**30
    group.add_argument("--num-kv-blocks", type=int, default=field_default(EngineConfig, "num_kv_blocks"),
                       metavar="N", help=f"KV cache blocks per worker (default: as many as {kv_gib:g} GiB hold)")
    group.add_argument("--max-num-batched-tokens", type=int, metavar="N",
                       default=field_default(EngineConfig, "max_num_batched_tokens"),
                       help="tokens per engine step; longer prompts are prefilled in chunks (default: %(default)s)")
    is_on = field_default(EngineConfig, "enable_prefix_caching")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=is_on,
                       help=f"reuse the KV blocks of prompt prefixes seen before (default: {'on' if is_on else 'off'})")
    # None: no SpeculativeConfig at all (its proposer has no default).
    group.add_argument("--speculative", choices=PROPOSERS, default=None,
                       help="speculative decoding on decode workers, drafting with this proposer (default: none)")
    group.add_argument("--num-speculative-tokens", type=int, metavar="K",
                       default=field_default(SpeculativeConfig, "num_speculative_tokens"),
                       help="with --speculative: draft tokens per step where neither the request nor the router "
                       "sets k (default: %(default)s)")
