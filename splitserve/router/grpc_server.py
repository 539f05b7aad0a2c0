"""The gRPC front end: ``splitserve.v1.Generation`` (protos/splitserve/v1/serving.proto) over a
``Frontend``.

``GrpcServer`` owns a grpc.aio server with three services: Generation, grpc.health.v1 (which
follows ``Frontend.is_ready``) and reflection. Protobuf stays here: requests become
``GenerateInput`` and ``GenerateDelta`` becomes a response in the pure functions below, and
errors map to statuses by type as ``splitserve.router.api`` describes; a RESOURCE_EXHAUSTED whose
CapacityError carries a retry hint also sends the ``grpc-retry-pushback-ms`` trailer. With API
keys configured every call but health checks needs one (UNAUTHENTICATED without); with TLS
files it listens with TLS (mutual with a CA bundle). A stream whose client takes no message
for ``send_timeout_s`` (it stopped reading; HTTP/2 flow control holds the write) is aborted
with DEADLINE_EXCEEDED, and so is its request. The serve command starts it inside the
router's event loop and stops it on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve.config import DEFAULT_GRPC_PORT, DEFAULT_SEND_TIMEOUT_S, AccessConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import CapacityError, ServingError
from splitserve.protocol import SLO, GenerateDelta, RequestReport
from splitserve.protos.splitserve.v1 import serving_pb2 as pb
from splitserve.protos.splitserve.v1 import serving_pb2_grpc as pb_grpc
from splitserve.router.access import OPEN_GRPC_SERVICES, UNAUTHENTICATED, is_authorized, read_pem
from splitserve.router.api import Frontend, GenerateInput
from splitserve.router.metrics import Metrics, observe_stream

logger = logging.getLogger(__name__)

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
# Sampling fields with proto3 presence: copied only when set, so unset keeps SamplingParams' default.
_OPTIONAL_SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos", "skip_special_tokens",
    "num_speculative_tokens",
)
# gRFC A6's server pushback: a client whose retry policy covers the status waits this long.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
# Without SO_REUSEPORT a second server on the same port fails at start instead of silently
# sharing the port's connections with the first. Bounds against hostile clients: a larger message
# ends its call RESOURCE_EXHAUSTED; streams beyond the bound wait on their connection (HTTP/2).
MAX_MESSAGE_BYTES = 4 << 20
MAX_STREAMS_PER_CONNECTION = 128
_SERVER_OPTIONS = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION)]
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ------------------------------------------------------------------ proto <-> api (pure)


def sampling_params_from_pb(request: pb.GenerateRequest) -> SamplingParams:
    """The request's SamplingParams; ValueError (SamplingParams' sentence) when out of range."""
    values: dict[str, object] = {name: getattr(request, name) for name in _OPTIONAL_SAMPLING_FIELDS
                                 if request.HasField(name)}
    if request.stop:
        values["stop"] = tuple(request.stop)
    if request.stop_token_ids:
        values["stop_token_ids"] = tuple(request.stop_token_ids)
    return SamplingParams(**values)  # type: ignore[arg-type]


def slo_from_pb(request: pb.GenerateRequest) -> SLO:
    """The request's SLO in seconds; ValueError naming the wire field when a target is not > 0."""
    if not request.HasField("slo"):
        return SLO()
    targets: dict[str, float | None] = {}
    for name in ("ttft_ms", "tpot_ms"):
        value = getattr(request.slo, name) if request.slo.HasField(name) else None
        if value is not None and not value > 0:  # also refuses NaN
            raise ValueError(f"slo.{name} must be positive when given, got {value!r}")
        targets[name] = None if value is None else value / 1000
    return SLO(ttft_s=targets["ttft_ms"], tpot_s=targets["tpot_ms"])


def input_from_pb(request: pb.GenerateRequest) -> GenerateInput:
    """A GenerateInput for the router; ValueError with a sentence for what the wire format
    cannot rule out (no input or several, sampling values, SLO). The router checks the rest."""
    given = [name for name, is_given in (
        ("prompt", request.HasField("prompt")),
        ("prompt_token_ids", len(request.prompt_token_ids) > 0),
        ("messages", len(request.messages) > 0),
    ) if is_given]
    if len(given) != 1:
        raise ValueError(
            "a request needs exactly one of prompt, prompt_token_ids and messages; "
            f"got {' and '.join(given) if given else 'none'}"
        )
    return GenerateInput(
        params=sampling_params_from_pb(request),
        prompt=request.prompt if request.HasField("prompt") else None,
        prompt_token_ids=list(request.prompt_token_ids) or None,
        messages=[{"role": m.role, "content": m.content} for m in request.messages] or None,
        model=request.model or None,
        request_id=request.request_id or None,
        slo=slo_from_pb(request),
    )


def delta_to_pb(delta: GenerateDelta) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=delta.request_id,
        token_ids=delta.token_ids,
        text=delta.text,
        finished=delta.finished,
        finish_reason=delta.finish_reason or "",
        usage=pb.Usage(prompt_tokens=delta.num_prompt_tokens, completion_tokens=delta.num_output_tokens),
        speculation=pb.Speculation(draft_tokens=delta.num_draft_tokens, accepted_tokens=delta.num_accepted_tokens),
        report=report_to_pb(delta.report) if delta.report is not None else None,
    )


def report_to_pb(report: RequestReport) -> pb.RequestReport:
    return pb.RequestReport(**report.wire_fields())


def status_for_error(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and details a failed request ends with (see splitserve.router.api)."""
    message = str(error) or type(error).__name__
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, message
    if isinstance(error, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, message
    if isinstance(error, ServingError):
        return grpc.StatusCode.UNAVAILABLE, message
    return grpc.StatusCode.INTERNAL, f"the server failed on this request ({type(error).__name__}: {message})"


def trailers_for_error(error: Exception) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a failed request ends with besides its status: for a refusal with a
    retry hint, grpc-retry-pushback-ms in whole milliseconds, rounded up."""
    if isinstance(error, CapacityError) and error.retry_after_s is not None:
        return ((RETRY_PUSHBACK_KEY, str(math.ceil(error.retry_after_s * 1000))),)
    return ()


# ------------------------------------------------------------------------- services


class _GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, frontend: Frontend, metrics: Metrics | None, send_timeout_s: float):
        self._frontend = frontend
        self._metrics = metrics
        self._send_timeout_s = send_timeout_s

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        try:
            generate_input = input_from_pb(request)
        except ValueError as error:
            if self._metrics is not None:
                self._metrics.count_error(error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        stream: AsyncIterator[GenerateDelta] | None = None

        async def close() -> None:
            # A client cancel (or stop) arrives as CancelledError at whichever await the handler
            # is in. Closing the frontend's iterator here, instead of leaving it to garbage
            # collection (which a live traceback can put off), makes the router abort the
            # request and free its blocks now.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

        try:
            stream = observe_stream(self._metrics, self._frontend.generate(generate_input))
            async for delta in stream:
                try:
                    async with asyncio.timeout(self._send_timeout_s):  # in this task: a cancel reaches the write
                        await context.write(delta_to_pb(delta))
                except TimeoutError:
                    raise _StalledClient(f"the client took no message for {self._send_timeout_s:g} s; the request "
                                         f"was aborted") from None
        except Exception as error:
            if context.cancelled():  # the client left mid-write: nobody to tell
                return
            code, details = status_for_error(error)
            if isinstance(error, _StalledClient):  # the request goes first: the status may wait on the client
                logger.warning("Generate %r: %s", request.request_id, error)
                await close()
                if self._metrics is not None:
                    self._metrics.count_error(ServingError(str(error)))
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("Generate %r failed", request.request_id)
            await context.abort(code, details, trailers_for_error(error))
        finally:
            await close()


class _StalledClient(Exception):
    """A stream's client took no message within the send timeout."""


class _ReadinessHealth(health_async.HealthServicer):
    """grpc.health.v1 following a readiness predicate for "" and Generation: Check asks it each
    time; Watch streams see a change at the next ``refresh`` (GrpcServer polls)."""

    def __init__(self, is_ready: Callable[[], bool]):
        super().__init__()
        self._is_ready = is_ready

    async def refresh(self) -> None:
        try:
            status = _SERVING if self._is_ready() else _NOT_SERVING
        except Exception:
            logger.exception("is_ready() failed; reporting NOT_SERVING")
            status = _NOT_SERVING
        for service in ("", GENERATION_SERVICE):
            await self.set(service, status)  # a no-op once shutdown has begun

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        await self.refresh()
        return await super().Check(request, context)


def _server_credentials(access: AccessConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the PEM files (mutual with a CA bundle); None without TLS."""
    if not access.tls:
        return None
    key, chain = read_pem(access.ssl_keyfile, "ssl_keyfile"), read_pem(access.ssl_certfile, "ssl_certfile")
    ca = read_pem(access.ssl_ca_certs, "ssl_ca_certs")
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca, require_client_auth=ca is not None)


class _ApiKeys(grpc.aio.ServerInterceptor):
    """Every call but health checks needs one of the keys in its ``authorization`` metadata
    ("Bearer <key>"); without it the call ends UNAUTHENTICATED before its handler runs."""

    def __init__(self, api_keys: tuple[str, ...]):
        self._api_keys = api_keys

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        service = details.method.strip("/").split("/")[0]
        metadata = {key: value for key, value in details.invocation_metadata or ()}
        if handler is None or service in OPEN_GRPC_SERVICES or \
                is_authorized(self._api_keys, metadata.get("authorization")):
            return handler
        return _denying(handler)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call UNAUTHENTICATED."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[(handler.request_streaming, handler.response_streaming)](
        deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class GrpcServer:
    """Serves Generation, health and reflection for one Frontend on a grpc.aio server.

    Call ``start`` and ``stop`` from the event loop the frontend runs in. health_poll_s: how
    often health Watch streams are brought up to date with ``frontend.is_ready()``. metrics:
    where request latencies and outcomes are recorded (None: nowhere). access: API keys and TLS
    (``splitserve.router.access``; None: open, plaintext). send_timeout_s: how long a stream's
    write may wait on a client that takes no message before the request is aborted.
    """

    def __init__(self, frontend: Frontend, *, health_poll_s: float = 1.0, metrics: Metrics | None = None,
                 access: AccessConfig | None = None, send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S):
        if not health_poll_s > 0:
            raise ValueError(f"health_poll_s must be positive, got {health_poll_s!r}")
        if not 0 < send_timeout_s < math.inf:
            raise ValueError(f"send_timeout_s must be positive and finite, got {send_timeout_s!r}")
        self._send_timeout_s = send_timeout_s
        self._frontend = frontend
        self._metrics = metrics
        self._access = access or AccessConfig()
        self._health_poll_s = health_poll_s
        self._server: grpc.aio.Server | None = None
        self._health: _ReadinessHealth | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self, host: str = "127.0.0.1", port: int = DEFAULT_GRPC_PORT) -> int:
        """Listen on host:port (port 0 picks a free one) and serve; return the bound port."""
        assert self._server is None, "GrpcServer.start was already called"
        credentials = _server_credentials(self._access)
        interceptors = [_ApiKeys(self._access.api_keys)] if self._access.api_keys else []
        server = grpc.aio.server(options=_SERVER_OPTIONS, interceptors=interceptors)
        service = _GenerationService(self._frontend, self._metrics, self._send_timeout_s)
        pb_grpc.add_GenerationServicer_to_server(service, server)
        self._health = _ReadinessHealth(self._frontend.is_ready)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((GENERATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        try:
            self.port = server.add_insecure_port(address) if credentials is None else \
                server.add_secure_port(address, credentials)
        except RuntimeError as error:  # grpc raises on a port in use or a foreign address
            raise ValueError(f"cannot listen on {address}: {error}") from error
        if self.port == 0:  # older grpc returned 0 instead
            raise ValueError(f"cannot listen on {address}")
        await self._health.refresh()
        await server.start()
        self._server = server
        self._poll_task = asyncio.create_task(self._poll_readiness(), name="grpc-health-poll")
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, refuse new calls, give running ones grace_s seconds, then cancel
        them (which aborts their requests)."""
        if self._server is None:
            return
        assert self._health is not None and self._poll_task is not None
        await self._health.enter_graceful_shutdown()
        self._poll_task.cancel()
        await self._server.stop(grace_s)
        self._server = None

    async def wait_for_termination(self) -> None:
        """Return once the server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _poll_readiness(self) -> None:
        assert self._health is not None
        while True:
            await asyncio.sleep(self._health_poll_s)
            await self._health.refresh()
