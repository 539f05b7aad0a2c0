"""Configuration: every setting of splitserve, in frozen dataclasses validated when built.

``EngineConfig`` (one engine), ``TransferConfig`` (KV handoff between workers), ``StoreConfig``
(the shared state and membership), ``WorkerConfig`` (one worker: the three embedded),
``ClusterConfig`` (what ``splitserve serve`` runs: the mode, worker counts and the shared
sub-configs), ``PlacementConfig`` and ``RoleConfig`` (how the router places prefills and moves
workers between pools), ``ServeConfig`` (where the API listens), ``SimConfig`` (the cluster
``splitserve simulate`` models) and ``ProfileConfig`` (what ``splitserve profile``
measures). Each value is stated and checked once, here; the command line reads its defaults
from these classes. Components take the scalars they need (``BlockPool(num_blocks,
block_size)``), never the root config; these classes exist so that a bad setting fails at
start-up with a sentence.

This module imports nothing heavy (no torch, no Ray), so a router process can read it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import torch

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
QUANTIZATIONS: tuple[str, ...] = ("int8",)  # splitserve.engine.linear implements each
TRANSFER_BACKENDS: tuple[str, ...] = ("collective", "grpc")
KV_CODECS: tuple[str, ...] = ("fp16", "int8", "raw")  # splitserve.transfer.codec implements each
MODES: tuple[str, ...] = ("elastic", "disaggregated", "colocated")
WORKER_KINDS: tuple[str, ...] = ("prefill", "decode", "colocated")
DEFAULT_STORE_PREFIX = "splitserve"
AUTO_HOST = "auto"  # TransferConfig.host: each worker advertises its own node's address
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")  # set by the deployment, not by pools
DEFAULT_GRPC_PORT = 50051
MIN_KV_AUTH_KEY_BYTES = 16
DEFAULT_SEND_TIMEOUT_S = 30.0  # how long a stream's write may wait on a client that takes nothing


def check_name(what: str, value: object) -> None:
    """ValueError unless ``value`` is a non-empty string without surrounding spaces."""
    if not isinstance(value, str) or not value or value != value.strip():
        raise ValueError(f"{what} must be a non-empty string without surrounding spaces, got {value!r}")


def check_resources(what: str, resources: Mapping[str, float]) -> None:
    """ValueError unless ``resources`` maps Ray custom resource names to positive amounts."""
    for name, amount in resources.items():
        check_name(f"a resource name in {what}", name)
        if name in RAY_BUILTIN_RESOURCES or name.startswith("node:"):
            raise ValueError(f"{what} takes custom resources; {name!r} is Ray's own (the deployment sets it)")
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not 0 < amount < math.inf:
            raise ValueError(f"{what}[{name!r}] must be a positive number, got {amount!r}")


def _check_choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


def _check_release_interval(value: float | None) -> None:
    if value is not None and not 0 < value < math.inf:
        raise ValueError(f"release_memory_every_s must be a positive number of seconds (or None: never), got {value}")


def _check_stream_interval(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"stream_interval must be an integer >= 1 (tokens per message), got {value!r}")


def _check_positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not 0 < value < math.inf:
            raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder, read from GGUF metadata or an HF config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    def kv_bytes_per_token(self, element_size: int) -> int:
        """Bytes of K and V one token occupies over all layers, at ``element_size`` bytes per
        element (4 for float32, 2 for bfloat16/float16)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * element_size


PROPOSERS = ("ngram", "draft", "layer_skip")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding for one engine.

    num_speculative_tokens: k for requests that do not set their own; max_speculative_tokens
    bounds what a request (or the router) may ask for. draft_model: a model file or folder for
    the "draft" proposer (None: the target itself, which accepts every draft). skip_layers:
    the layers "layer_skip" leaves out (None: every other layer of the middle half).
    """

    proposer: str
    num_speculative_tokens: int = 3
    max_speculative_tokens: int = 8
    ngram_min: int = 2
    ngram_max: int = 4
    draft_model: str | None = None
    skip_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.proposer not in PROPOSERS:
            raise ValueError(f"proposer must be one of {', '.join(PROPOSERS)}, got {self.proposer!r}")
        if not 0 <= self.num_speculative_tokens <= self.max_speculative_tokens:
            raise ValueError(
                f"num_speculative_tokens must be in [0, max_speculative_tokens={self.max_speculative_tokens}], "
                f"got {self.num_speculative_tokens}"
            )
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"ngram sizes need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.skip_layers is not None:
            object.__setattr__(self, "skip_layers", tuple(self.skip_layers))


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine (one worker process).

    model: a GGUF file or an HF folder; None means the default SmolLM2-135M-Instruct.
    dtype: the weights', activations' and KV cache's dtype.
    quantization: None keeps the projections' weights in ``dtype``; "int8" holds them as int8
        with one scale per output channel (weight-only; their GEMMs take bf16 inputs), the
        rest of the model staying in ``dtype`` (docs/benchmarks.md#precision: speed and accuracy).
    num_kv_blocks: None sizes the cache from kv_cache_bytes.
    max_num_batched_tokens: the per-step token budget that chunks long prefills.
    enforce_eager: run the model eagerly (the default). False compiles each decoder layer's
        work around attention with torch.compile when the engine starts (the attention stays
        eager; splitserve.engine.compiled): that start takes seconds to tens of seconds, and here
        the compiled steps gained nothing clear of the noise (docs/benchmarks.md#compiled-forward).
        If compiling fails, the engine logs why and runs eager.
    """

    model: str | None = None
    dtype: str = "float32"
    quantization: str | None = None
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    speculative: SpeculativeConfig | None = None
    enforce_eager: bool = True

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be True or False, got {self.enforce_eager!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or None (weights in dtype), "
                             f"got {self.quantization!r}")
        positive = ("block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("num_kv_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive when given, got {value}")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch  # here, not at the top: the router reads this module without torch

        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype


@dataclass(frozen=True)
class TransferConfig:
    """How a prompt's KV moves from the prefill worker to the decode worker.

    backend: "collective" (torch.distributed point-to-point: Gloo on CPU, NCCL on GPU) or
    "grpc". kv_codec: the wire encoding of K/V. host: the address other workers reach this
    one's KV receiver at ("auto": each worker's own node address, as Ray knows it -- what a
    deployment spanning hosts needs). timeout_s: a handoff's deadline (each chunk's send, and the decode
    side's wait). reservation_lease_s: a decode reservation is a lease its router renews while
    the prompt is prefilled (every third of it); one not renewed for this long is released, so
    the blocks of a router that died come back within it. auth_key: the deployment's shared
    secret for KV links (at least 16 bytes; kept out of repr): receivers refuse chunks, and the
    collective rendezvous refuses peers, that do not prove it (None: any peer is taken;
    ``splitserve.transfer.auth``).
    """

    backend: str = "collective"
    kv_codec: str = "raw"
    layers_per_chunk: int = 6
    host: str = "127.0.0.1"
    timeout_s: float = 30.0
    reservation_lease_s: float = 10.0
    auth_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_choice("transfer backend", self.backend, TRANSFER_BACKENDS)
        if self.auth_key is not None and (not isinstance(self.auth_key, bytes)
                                          or len(self.auth_key) < MIN_KV_AUTH_KEY_BYTES):
            raise ValueError(f"the KV auth key must be at least {MIN_KV_AUTH_KEY_BYTES} bytes")
        _check_choice("kv_codec", self.kv_codec, KV_CODECS)
        check_name("host", self.host)
        if self.layers_per_chunk < 1:
            raise ValueError(f"layers_per_chunk must be >= 1, got {self.layers_per_chunk}")
        _check_positive(self, "timeout_s", "reservation_lease_s")


@dataclass(frozen=True)
class StoreConfig:
    """The shared state: a Redis server (``redis_url``) or, when None, the embedded store (a
    Ray actor, one machine). ``prefix`` namespaces one deployment's state. Workers renew their
    membership every ``heartbeat_s`` and drop out ``ttl_s`` after their last renewal. Every
    store call gives up after ``timeout_s`` (it raises), shorter than the TTL, so
    one stalled call cannot outlast a live worker's membership."""

    redis_url: str | None = None
    prefix: str = DEFAULT_STORE_PREFIX
    heartbeat_s: float = 0.5
    ttl_s: float = 3.0
    timeout_s: float = 1.0

    def __post_init__(self) -> None:
        check_name("store prefix", self.prefix)
        if self.redis_url is not None:
            check_name("redis_url", self.redis_url)
        if not 0 < self.heartbeat_s < self.ttl_s < math.inf:
            raise ValueError(f"need 0 < heartbeat_s < ttl_s, got {self.heartbeat_s}, {self.ttl_s}")
        if not 0 < self.timeout_s < self.ttl_s:
            raise ValueError(f"need 0 < timeout_s < ttl_s (a stalled store call must give up before a live "
                             f"worker's membership lapses), got {self.timeout_s}, {self.ttl_s}")


@dataclass(frozen=True)
class WorkerConfig:
    """One worker: its id and kind, its engine, and the deployment's transfer and store settings.
    num_threads: torch threads for the engine (None: torch's default). profile_at_start: a few
    synthetic steps seed the latency model before the worker serves. stream_interval: a
    request's tokens go to its router in messages of at least this many (its first token and its
    last go at once), so fewer messages cost the worker and the router CPU. num_cpus: the Ray
    CPUs its actor requests on a CPU cluster (None: ``num_threads``, or 1). resources: the Ray
    custom resources its actor requests (which node group it may run on).
    release_memory_every_s: at most this often, if it stepped since, the engine thread hands the
    heap memory its steps freed back to the OS (``EngineLoop``; None: never)."""

    worker_id: str
    kind: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    num_threads: int | None = None
    num_cpus: float | None = None
    profile_at_start: bool = True
    stream_interval: int = 1
    resources: Mapping[str, float] = field(default_factory=dict)
    release_memory_every_s: float | None = 10.0

    def __post_init__(self) -> None:
        check_name("worker_id", self.worker_id)
        check_resources("resources", self.resources)
        _check_choice("worker kind", self.kind, WORKER_KINDS)
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.num_cpus is not None and not 0 < self.num_cpus < math.inf:
            raise ValueError(f"num_cpus must be a positive number of CPUs, got {self.num_cpus}")
        _check_stream_interval(self.stream_interval)
        _check_release_interval(self.release_memory_every_s)

    @property
    def ray_cpus(self) -> float:
        """The CPUs its actor asks Ray for on a CPU cluster."""
        return self.num_cpus or self.num_threads or 1


@dataclass(frozen=True)
class ClusterConfig:
    """What ``splitserve serve`` runs, by ``mode``:

    - "elastic" (the default): ``num_workers`` workers (default 2), each able to prefill for a
      remote worker, decode a handed-off request or run one end to end. They start split into a
      prefill and a decode pool (``num_prefill_workers`` / ``num_decode_workers``; default half
      of them prefill, rounded down), and the router places each request's prefill remote or
      local from its latency predictions.
    - "disaggregated": the fixed split, never a local prefill (default 1 + 1).
    - "colocated": ``num_workers`` workers (default 1) that run every request end to end.

    engine: every worker's engine settings; decode_engine, if given, replaces them for every
    worker that may decode (speculation lives there): all but disaggregated prefill workers.
    num_threads: torch threads per worker (None: the cluster's CPUs split evenly, or
    ``cpus_per_worker`` rounded down, at least 1). cpus_per_worker: the Ray CPUs each worker
    asks for (None: its thread count); a fraction lets more workers than cores share a small
    machine (demos, tests), each still running its threads.
    stream_interval: tokens per message from a worker to its router; release_memory_every_s: how
    often a busy worker hands freed heap memory back (both ``WorkerConfig``).
    prefill_resources / decode_resources: the Ray custom resources each worker starting in that
    pool requests, which pins the pool to the nodes that offer them (colocated workers take the
    decode pool's); resource_wait_s: how long the deployment waits for the resources its
    workers need (nodes that join later, an autoscaler) before it gives up. restart_workers:
    a worker whose process died is replaced by a new one of the same name, which loads the
    model and joins again (``Deployment``; False: the cluster serves on with fewer workers).
    """

    mode: str = "elastic"
    num_workers: int | None = None
    num_prefill_workers: int | None = None
    num_decode_workers: int | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    decode_engine: EngineConfig | None = None
    transfer: TransferConfig = field(default_factory=TransferConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    num_threads: int | None = None
    cpus_per_worker: float | None = None
    stream_interval: int = 1
    release_memory_every_s: float | None = 10.0
    prefill_resources: Mapping[str, float] = field(default_factory=dict)
    decode_resources: Mapping[str, float] = field(default_factory=dict)
    resource_wait_s: float = 600.0
    restart_workers: bool = True

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        self.worker_counts()  # checks the counts
        check_resources("prefill_resources", self.prefill_resources)
        check_resources("decode_resources", self.decode_resources)
        if not 0 <= self.resource_wait_s < math.inf:
            raise ValueError(f"resource_wait_s must be >= 0, got {self.resource_wait_s}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.cpus_per_worker is not None and not 0 < self.cpus_per_worker < math.inf:
            raise ValueError(f"cpus_per_worker must be a positive number of CPUs, got {self.cpus_per_worker}")
        _check_stream_interval(self.stream_interval)
        _check_release_interval(self.release_memory_every_s)

    def worker_counts(self) -> dict[str, int]:
        """Workers per starting role; ValueError (a sentence) for counts the mode cannot run."""
        total, prefill, decode = self.num_workers, self.num_prefill_workers, self.num_decode_workers
        for name, value in (("workers", total), ("prefill workers", prefill), ("decode workers", decode)):
            if value is not None and value < 0:
                raise ValueError(f"the number of {name} must be >= 0, got {value}")
        if self.mode == "colocated":
            if prefill is not None or decode is not None:
                raise ValueError("colocated mode has no prefill/decode split: give the number of workers only")
            counts = {"colocated": 1 if total is None else total}
        elif self.mode == "disaggregated":
            counts = {"prefill": 1 if prefill is None else prefill, "decode": 1 if decode is None else decode}
            if min(counts.values()) < 1:
                raise ValueError(f"disaggregated mode needs at least one prefill and one decode worker, got {counts}")
        else:
            if total is None:
                total = (prefill or 0) + (decode or 0) if prefill is not None and decode is not None else 2
            if prefill is None:
                prefill = total // 2 if decode is None else total - decode
            decode = total - prefill if decode is None else decode
            counts = {"prefill": prefill, "decode": decode}
            if prefill < 0 or decode < 1 or prefill + decode != total:
                raise ValueError(f"elastic mode needs a split of its {total} workers into prefill + decode with at "
                                 f"least one decode worker, got {prefill} + {decode}")
        if sum(counts.values()) < 1:
            raise ValueError(f"{self.mode} mode needs at least one worker")
        return counts

    def worker_configs(self, num_cpus: float, num_gpus: float) -> list[WorkerConfig]:
        """Every worker's config, one GPU each when there are enough GPUs for all (then the
        engines run on CUDA), else the CPUs split evenly. Ids are ``{prefix}.worker-{i}`` in
        elastic mode (roles change), else ``{prefix}.{kind}-{i}``."""
        counts = self.worker_counts()
        total = sum(counts.values())
        share = int(num_cpus) // total if self.cpus_per_worker is None else int(self.cpus_per_worker)
        threads = self.num_threads or max(share, 1)
        configs = []
        for kind, count in counts.items():
            is_fixed_prefill = self.mode == "disaggregated" and kind == "prefill"
            engine = self.engine if is_fixed_prefill or self.decode_engine is None else self.decode_engine
            if num_gpus >= total and engine.device == "cpu":
                engine = replace(engine, device="cuda")
            for i in range(count):
                name = f"worker-{len(configs)}" if self.mode == "elastic" else f"{kind}-{i}"
                resources = self.prefill_resources if kind == "prefill" else self.decode_resources
                configs.append(WorkerConfig(f"{self.store.prefix}.{name}", kind, engine, self.transfer, self.store,
                                            num_threads=threads, num_cpus=self.cpus_per_worker or threads,
                                            stream_interval=self.stream_interval, resources=dict(resources),
                                            release_memory_every_s=self.release_memory_every_s))
        return configs


@dataclass(frozen=True)
class PlacementConfig:
    """How an elastic router places prefills (splitserve.router.prefill_placement).

    chunk_tokens: the prefill chunk sizes a local prefill may use (of those whose mixed steps
    keep the running requests within their TPOT SLO, the one with the soonest first token wins).
    margin_sigmas: each prediction gets this many of its model's fit RMSE added per step.
    correction_weight: how fast a worker's observed/predicted TTFT ratio follows new requests;
    the ratio, kept within ``correction_bounds``, scales that worker's predictions.
    tail_quantile / tail_window: the TPOT guard protects running requests with the correction
    raised to this quantile of the worker's last ``tail_window`` observed/predicted ratios.
    admission: refuse a request that no placement is predicted to serve within its SLO; False:
    place it as well as the predictions allow (SLOs still steer placement and chunk sizes).
    """

    chunk_tokens: tuple[int, ...] = (512, 256, 128, 64, 32)
    margin_sigmas: float = 1.0
    correction_weight: float = 0.2
    correction_bounds: tuple[float, float] = (0.5, 4.0)
    tail_quantile: float = 0.9
    tail_window: int = 32
    admission: bool = True

    def __post_init__(self) -> None:
        if not self.chunk_tokens or any(c < 1 for c in self.chunk_tokens):
            raise ValueError(f"chunk_tokens must be one or more sizes >= 1, got {self.chunk_tokens}")
        if not 0 <= self.margin_sigmas < math.inf:
            raise ValueError(f"margin_sigmas must be >= 0, got {self.margin_sigmas}")
        if not 0 < self.correction_weight <= 1:
            raise ValueError(f"correction_weight must be in (0, 1], got {self.correction_weight}")
        low, high = self.correction_bounds
        if not 0 < low <= 1 <= high < math.inf:
            raise ValueError(f"correction_bounds must be (low, high) with 0 < low <= 1 <= high, got "
                             f"{self.correction_bounds}")
        if not 0.5 <= self.tail_quantile <= 1:
            raise ValueError(f"tail_quantile must be in [0.5, 1], got {self.tail_quantile}")
        if self.tail_window < 1:
            raise ValueError(f"tail_window must be >= 1, got {self.tail_window}")


@dataclass(frozen=True)
class RoleConfig:
    """How an elastic deployment moves workers between its prefill and decode pools
    (splitserve.router.roles): every ``interval_s`` it compares the split with the one that
    loads both pools equally and moves one worker when that is more than 0.5 + ``hysteresis``
    workers away and the last move is ``min_dwell_s`` old. enabled: False keeps the starting
    split."""

    enabled: bool = True
    interval_s: float = 2.0
    min_dwell_s: float = 20.0
    hysteresis: float = 0.25

    def __post_init__(self) -> None:
        _check_positive(self, "interval_s")
        if not (0 <= self.min_dwell_s < math.inf and 0 <= self.hysteresis < math.inf):
            raise ValueError(f"need min_dwell_s >= 0 and hysteresis >= 0, got {self.min_dwell_s}, {self.hysteresis}")


@dataclass(frozen=True)
class AccessConfig:
    """Who may call the front ends (gRPC and HTTP alike).

    api_keys: a caller must present one of them (``Authorization: Bearer <key>``; empty: no
    key needed); health and liveness stay open. ssl_certfile / ssl_keyfile: PEM files of the
    server's certificate chain and key (both or neither): TLS. ssl_ca_certs: PEM CA bundle;
    given, clients must present a certificate it signed (mutual TLS).
    """

    api_keys: tuple[str, ...] = ()
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_ca_certs: str | None = None

    def __post_init__(self) -> None:
        for key in self.api_keys:
            if not isinstance(key, str) or not key or any(c.isspace() for c in key):
                raise ValueError("an API key must be a non-empty string without spaces")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("TLS needs both ssl_certfile and ssl_keyfile")
        if self.ssl_ca_certs is not None and self.ssl_certfile is None:
            raise ValueError("ssl_ca_certs (mutual TLS) needs ssl_certfile and ssl_keyfile too")

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None


@dataclass(frozen=True)
class ServeConfig:
    """Where the API listens and how Ray is found. address: None starts a local Ray (or uses
    the one this process already joined); "auto" or "HOST:PORT" joins an existing cluster.
    http_port: the OpenAI-compatible HTTP API's port (None: no HTTP; 0: a free port).
    slo_ttft_s / slo_tpot_s: latency targets for requests that set none (admission refuses what
    it predicts would miss them; None: no target). placement / roles: how an elastic router
    places prefills and (unless a router replica) moves workers between pools. router_only: start no workers; route over
    the ones listed in the store (its ``redis_url`` and ``prefix``), which another server
    started, and leave them running at shutdown. grace_s: what in-flight requests get at
    shutdown. migration_limit: how many times a request may move to another worker when the
    one running it dies (0: never). max_queued_requests: requests that may wait for their first
    token at once; one more is refused at once with a retry hint (None: no bound).
    stream_lease_s: a worker aborts the requests it streams to a router it has not heard from
    for this long (the router renews every third of it), so a router that dies leaves no
    request decoding for nobody. stream_check_s: a worker's stream silent for this long makes
    the router ask the worker whether it still holds the request; one that twice does not lost
    the stream's end, and the request moves on. send_timeout_s: a stream whose client takes no
    data for this long (it stopped reading) is aborted, on both front ends. access: API keys
    and TLS of both front ends."""

    grpc_host: str = "127.0.0.1"
    grpc_port: int = DEFAULT_GRPC_PORT
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    address: str | None = None
    grace_s: float = 30.0
    start_timeout_s: float = 600.0
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    router_only: bool = False
    migration_limit: int = 3
    max_queued_requests: int | None = None
    stream_lease_s: float = 10.0
    stream_check_s: float = 20.0
    send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S
    access: AccessConfig = field(default_factory=AccessConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    roles: RoleConfig = field(default_factory=RoleConfig)

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in 0..65535 (0: a free port), got {port}")
        for name in ("slo_ttft_s", "slo_tpot_s"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"{name} must be positive when given, got {value}")
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {self.migration_limit}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        for name in ("stream_lease_s", "stream_check_s", "send_timeout_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be positive and finite, got {getattr(self, name)}")
        if self.grace_s < 0 or self.start_timeout_s <= 0:
            raise ValueError(f"need grace_s >= 0 and start_timeout_s > 0, got {self.grace_s}, {self.start_timeout_s}")


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name`` (its factory's value, if it has one):
    the command line reads its flag defaults here, so each default is stated once."""
    spec = next((f for f in fields(cls) if f.name == name), None)
    assert spec is not None, f"{cls.__name__} has no field {name!r}"
    if spec.default_factory is not MISSING:
        return spec.default_factory()
    assert spec.default is not MISSING, f"{cls.__name__}.{name} has no default"
    return spec.default


SimMode = Literal["disaggregated", "colocated", "elastic"]
ColocatedScheduler = Literal["prefill-first", "chunked"]
DecodeChoice = Literal["prefill-end", "arrival"]
PrefillBatching = Literal["whole-prompts", "chunked"]


@dataclass(frozen=True)
class SimConfig:
    """The simulated cluster.

    disaggregated: ``num_prefill`` instances of TP ``prefill_tp`` and ``num_decode`` of TP
    ``decode_tp``. elastic: the same instances as the starting split, each able to run either
    phase; ``placement`` (the router's PlacementConfig) places each request, ``roles`` moves
    instances between the pools. colocated: ``num_instances`` of TP ``tp``, each doing both phases with
    ``colocated_scheduler``: ``prefill-first`` (an iteration is a batch of whole prompts when
    prompts wait, else a decode step: vLLM v0) or ``chunked`` (every iteration decodes the
    running requests and fills the rest of ``max_batched_tokens`` with prompt chunks: Sarathi).
    ``decode_choice`` (disaggregated): when a request's decode instance is chosen -- when its
    prefill ends (DistServe's order) or at its arrival, with the prefill instance (splitserve's
    router, which reserves the decode worker's blocks before the prefill). ``prefill_batching``
    (disaggregated): a prefill instance's batch is whole prompts within its KV capacity
    (DistServe's) or the engine's step, prompt chunks of at most ``max_batched_tokens``.
    ``max_num_seqs``: the requests an instance admits at once (the engine's ``max_num_seqs``;
    a prefill batch's prompts, too); None: no bound but KV (DistServe's).
    """

    mode: SimMode = "disaggregated"
    num_prefill: int = 1
    prefill_tp: int = 1
    num_decode: int = 1
    decode_tp: int = 1
    num_instances: int = 1
    tp: int = 1
    colocated_scheduler: ColocatedScheduler = "prefill-first"
    decode_choice: DecodeChoice = "prefill-end"
    prefill_batching: PrefillBatching = "whole-prompts"
    # the engine's per-step token budget, which chunks its prefills: the same budget here
    max_batched_tokens: int = field_default(EngineConfig, "max_num_batched_tokens")
    max_num_seqs: int | None = None
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    roles: RoleConfig = field(default_factory=RoleConfig)

    def __post_init__(self) -> None:
        if self.mode not in get_args(SimMode):
            raise ValueError(f"mode must be one of {get_args(SimMode)}, got {self.mode!r}")
        if self.colocated_scheduler not in get_args(ColocatedScheduler):
            raise ValueError(f"colocated_scheduler must be one of {get_args(ColocatedScheduler)}, "
                             f"got {self.colocated_scheduler!r}")
        if self.decode_choice not in get_args(DecodeChoice):
            raise ValueError(f"decode_choice must be one of {get_args(DecodeChoice)}, got {self.decode_choice!r}")
        if self.prefill_batching not in get_args(PrefillBatching):
            raise ValueError(f"prefill_batching must be one of {get_args(PrefillBatching)}, "
                             f"got {self.prefill_batching!r}")
        for name in ("num_prefill", "prefill_tp", "num_decode", "decode_tp", "num_instances", "tp",
                     "max_batched_tokens", "max_num_seqs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_gpus(self) -> int:
        if self.mode in ("disaggregated", "elastic"):
            return self.num_prefill * self.prefill_tp + self.num_decode * self.decode_tp
        return self.num_instances * self.tp

    def describe(self) -> str:
        """E.g. 'disaggregated 2P(TP1)+1D(TP2)' or 'colocated 4x(TP1) chunked'."""
        if self.mode in ("disaggregated", "elastic"):
            split = f"{self.num_prefill}P(TP{self.prefill_tp})+{self.num_decode}D(TP{self.decode_tp})"
            fixed = " fixed roles" if self.mode == "elastic" and not self.roles.enabled else ""
            options = []
            if self.mode == "disaggregated" and self.prefill_batching == "chunked":
                options.append(f"prefill chunks of {self.max_batched_tokens}")
            if self.mode == "disaggregated" and self.decode_choice == "arrival":
                options.append("decode chosen at arrival")
            return f"{self.mode} {split}{fixed}" + "".join(f", {o}" for o in options)
        return f"colocated {self.num_instances}x(TP{self.tp}) {self.colocated_scheduler}"


@dataclass(frozen=True)
class ProfileConfig:
    """What ``splitserve profile`` measures on this machine (splitserve.profiler).

    engine: the engine measured, as a worker would build it (its KV cache size gives the
    profile's capacity; its ``speculative`` proposer, if any, the draft-token shapes).
    repeats: timed steps per shape (the budget: 1 is the smallest run). max_tokens: the largest
    prefill batch and the longest decode context, in tokens (at most the engine's step budget
    for prefills). max_batch: the largest decode batch. transfer_backends: the KV transfer
    backends whose bandwidth is measured over loopback; transfer_backend: the one whose number
    the simulator uses (``kv_transfer_bytes_per_s``). transfer_tokens: the prompt length whose KV
    each measured transfer sends. num_threads: torch threads (None: torch's default).
    """

    engine: EngineConfig = field(default_factory=EngineConfig)
    repeats: int = 3
    max_tokens: int = 1024
    max_batch: int = 32
    transfer_backends: tuple[str, ...] = TRANSFER_BACKENDS
    transfer_backend: str = field_default(TransferConfig, "backend")
    transfer_tokens: int = 512
    num_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("repeats", "max_tokens", "max_batch", "transfer_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be at least 16 (the smallest shape measured), got {self.max_tokens}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        object.__setattr__(self, "transfer_backends", tuple(self.transfer_backends))
        for backend in self.transfer_backends:
            _check_choice("transfer backend", backend, TRANSFER_BACKENDS)
        if self.transfer_backends and self.transfer_backend not in self.transfer_backends:
            raise ValueError(f"transfer_backend {self.transfer_backend!r} must be one of the measured backends "
                             f"({', '.join(self.transfer_backends) or 'none'})")


PLAN_MODES: tuple[str, ...] = ("disaggregated", "colocated", "elastic")


@dataclass(frozen=True)
class PlanConfig:
    """What ``splitserve plan`` searches (splitserve/sim/planner.py).

    num_gpus: the GPUs a layout may use (at most). modes: of PLAN_MODES; colocated is searched
    once per scheduler in ``colocated_schedulers``. attainment: the share of requests that must
    meet both SLOs (DistServe's 90%). num_requests: requests simulated per probed rate (the same
    lengths at every rate, arrival gaps scaled: common random numbers). min_rate: the lowest rate
    worth finding (req/s); a layout that fails it has goodput 0. rate_tolerance: a binary search
    stops when its bracket is within this fraction of its upper end. top: layouts kept per mode
    (pruning keeps exactly these right). max_batched_tokens: the chunked scheduler's budget, and
    elastic instances'. prefill_chunk_tokens / admission: elastic placement's chunk sizes and
    whether it refuses what it predicts to miss its SLO (PlacementConfig).
    """

    num_gpus: int
    modes: tuple[str, ...] = ("disaggregated", "colocated")
    colocated_schedulers: tuple[ColocatedScheduler, ...] = ("prefill-first", "chunked")
    attainment: float = 0.9
    num_requests: int = 2000
    min_rate: float = 0.05
    rate_tolerance: float = 0.02
    top: int = 3
    seed: int = 0
    max_batched_tokens: int = field_default(SimConfig, "max_batched_tokens")
    prefill_chunk_tokens: tuple[int, ...] = field_default(PlacementConfig, "chunk_tokens")
    admission: bool = field_default(PlacementConfig, "admission")

    def __post_init__(self) -> None:
        PlacementConfig(chunk_tokens=self.prefill_chunk_tokens)  # checks them
        for name in ("num_gpus", "num_requests", "top", "max_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.modes or any(mode not in PLAN_MODES for mode in self.modes):
            raise ValueError(f"modes must be some of {PLAN_MODES}, got {self.modes}")
        if "colocated" in self.modes and (not self.colocated_schedulers or any(
                s not in get_args(ColocatedScheduler) for s in self.colocated_schedulers)):
            raise ValueError(f"colocated_schedulers must be some of {get_args(ColocatedScheduler)}, "
                             f"got {self.colocated_schedulers}")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"attainment must be in (0, 1], got {self.attainment}")
        if not 0 < self.min_rate < math.inf:
            raise ValueError(f"min_rate must be a positive number of requests/s, got {self.min_rate}")
        if not 0 < self.rate_tolerance < 1:
            raise ValueError(f"rate_tolerance must be in (0, 1), got {self.rate_tolerance}")
