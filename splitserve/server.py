"""The serving assembly. Server: a Deployment of the worker classes, a Router over it and the
gRPC (and optional OpenAI HTTP) front ends, started and stopped as one; or, with
``router_only``, a router replica: the Router and front ends alone, over workers another Server
started on the same Redis and Ray cluster (it never imports the workers, torch or the model).

``splitserve serve`` runs one in the foreground until SIGINT/SIGTERM; tests and benchmarks run
one in a background thread (``with Server(config) as server: ...``). Shutdown order keeps
requests whole: health turns NOT_SERVING and new requests are refused, in-flight ones get
``grace_s`` to finish (then are cancelled, which aborts them on the workers), the HTTP and
gRPC servers stop, and last the workers leave the store and their actors end.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import ray

from splitserve.cluster import RAY_NAMESPACE
from splitserve.cluster.deployment import Deployment
from splitserve.cluster.stores import make_store
from splitserve.config import ClusterConfig, ServeConfig
from splitserve.engine.model_files import default_model_path, load_tokenizer
from splitserve.protocol import SLO
from splitserve.router.grpc_server import GrpcServer
from splitserve.router.http_server import HttpServer
from splitserve.router.metrics import Metrics
from splitserve.router.router import Router
from splitserve.worker_actor import WorkerActor

logger = logging.getLogger(__name__)

def connect_ray(address: str | None) -> None:
    """Join (or start) Ray unless this process already did. Ray installs its own SIGTERM
    handler here, so a command line that handles signals connects before installing its own."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=True)


class Server:
    """Everything ``splitserve serve`` runs, on an asyncio loop of its own thread or the caller's."""

    def __init__(self, config: ClusterConfig, options: ServeConfig | None = None):
        self.config = config
        self.options = options or ServeConfig()
        if self.options.router_only and config.store.redis_url is None:
            raise ValueError("a router replica needs the Redis its workers use (--redis-url, redis_url): "
                             "the embedded store lives with the Server that started them")
        self.deployment = None if self.options.router_only else Deployment(config, WorkerActor)
        self.router: Router | None = None
        self.port: int | None = None
        self._grpc: GrpcServer | None = None
        self._http: HttpServer | None = None
        self.http_port: int | None = None
        self.metrics = Metrics()  # both front ends record here; the router may report into it too
        self._store = None
        self._stop: asyncio.Event | None = None
        self._aio: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def address(self) -> str:
        return f"{self.options.grpc_host}:{self.port}"

    # ------------------------------------------------------------------ in the foreground

    async def run(self, on_ready=None) -> None:
        """Start, call ``on_ready(self)``, serve until ``request_stop``, then shut down."""
        self._aio = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self._start()
            if on_ready is not None:
                on_ready(self)
            self._started.set()
            await self._stop.wait()
        finally:
            await self._shutdown()

    def request_stop(self) -> None:
        """Begin a clean shutdown (thread- and signal-safe)."""
        if self._aio is not None and self._stop is not None:
            self._aio.call_soon_threadsafe(self._stop.set)

    async def _start(self) -> None:
        """The front ends first, so probes get answers while the workers start (/livez 200,
        /health 503 and gRPC health NOT_SERVING until they are ready), then the workers."""
        connect_ray(self.options.address)
        model = self.config.engine.model
        store = self.config.store
        self._store = await asyncio.to_thread(make_store, store)
        tokenizer = await asyncio.to_thread(load_tokenizer, model)
        self.router = Router(self._store, tokenizer, model or default_model_path(), mode=self.config.mode,
                             block_size=self.config.engine.block_size, metrics=self.metrics,
                             default_slo=SLO(self.options.slo_ttft_s, self.options.slo_tpot_s),
                             placement=self.options.placement, migration_limit=self.options.migration_limit,
                             max_queued_requests=self.options.max_queued_requests,
                             stream_lease_s=self.options.stream_lease_s,
                             stream_check_s=self.options.stream_check_s,
                             roles=None if self.options.router_only else self.options.roles)
        self._grpc = GrpcServer(self.router, metrics=self.metrics, access=self.options.access,
                                send_timeout_s=self.options.send_timeout_s)
        self.port = await self._grpc.start(self.options.grpc_host, self.options.grpc_port)
        if self.options.http_port is not None:
            self._http = HttpServer(self.router, self.metrics, self.options.access, self.options.send_timeout_s)
            self.http_port = await self._http.start(self.options.http_host, self.options.http_port)
        if self.deployment is not None:
            await self.deployment.start(self.options.start_timeout_s,
                                        cluster_may_grow=self.options.address is not None)
        await self.router.refresh(force=True)
        if not self.router.is_ready():  # a replica may start before its workers; health says so
            logger.warning("splitserve: no live %s workers under store prefix %r yet; health stays NOT_SERVING "
                           "until they join", self.config.mode, self.config.store.prefix)
        self.router.start()
        logger.info("splitserve: serving %s (%s) on %s", self.router.model_name, self.config.mode, self.address)

    async def _shutdown(self) -> None:
        if self.router is not None:
            await self.router.close(self.options.grace_s)
        # After router.close: in-flight HTTP requests had the same grace as gRPC ones.
        if self._http is not None:
            await self._http.stop(grace_s=1.0)
        if self._grpc is not None:
            await self._grpc.stop(grace_s=1.0)
        if self.deployment is not None:
            await self.deployment.stop()
        if self._store is not None:
            self._store.close()

    # ---------------------------------------------------------------- in the background

    def start(self) -> Server:
        """Run in a background thread; return once serving (raises what start-up raised)."""

        def main() -> None:
            try:
                asyncio.run(self.run())
            except BaseException as e:
                self._error = e
                self._started.set()

        self._thread = threading.Thread(target=main, name="splitserve-server", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout_s: float = 120.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, coro):
        """Run a coroutine on the server's loop from another thread (tests, benchmarks)."""
        assert self._aio is not None
        return asyncio.run_coroutine_threadsafe(coro, self._aio).result()
