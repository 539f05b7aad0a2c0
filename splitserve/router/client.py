"""A blocking client of a splitserve server: ``make_request`` builds a GenerateRequest,
``GenerationClient.generate`` streams its responses, ``wait_ready`` polls the health service,
``pushback_s`` reads a refusal's retry hint from its trailing metadata.

Used by ``splitserve client`` and by tests; any gRPC client generated from
protos/splitserve/v1/serving.proto works the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.config import DEFAULT_GRPC_PORT
from splitserve.protos.splitserve.v1 import serving_pb2 as pb
from splitserve.protos.splitserve.v1 import serving_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = f"localhost:{DEFAULT_GRPC_PORT}"
GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # the health service's name for it
_READY_POLL_S = 0.1
_RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRFC A6; the server's grpc_server.RETRY_PUSHBACK_KEY
# gRPC's reconnect backoff grows to two minutes; capped at a second, wait_ready notices a server
# that has just come up within a second.
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]


def make_request(
    prompt: str | None = None,
    *,
    prompt_token_ids: Sequence[int] = (),
    messages: Sequence[Mapping[str, str]] = (),
    model: str = "",
    request_id: str = "",
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool | None = None,
    skip_special_tokens: bool | None = None,
    num_speculative_tokens: int | None = None,
    ttft_ms: float | None = None,
    tpot_ms: float | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest; None leaves a field unset, so the server's default applies.

    Give exactly one of prompt, prompt_token_ids and messages ({"role", "content"} dicts); the
    server checks that and every value.
    """
    request = pb.GenerateRequest(
        model=model, request_id=request_id, prompt_token_ids=prompt_token_ids, stop=stop,
        stop_token_ids=stop_token_ids,
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
    )
    optional = {
        "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
        "seed": seed, "ignore_eos": ignore_eos, "skip_special_tokens": skip_special_tokens,
        "num_speculative_tokens": num_speculative_tokens,
    }
    for name, value in optional.items():
        if value is not None:
            setattr(request, name, value)
    for name, target in (("ttft_ms", ttft_ms), ("tpot_ms", tpot_ms)):
        if target is not None:
            setattr(request.slo, name, target)
    return request


def pushback_s(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """The seconds a refused call's server asks the client to wait before retrying (its
    grpc-retry-pushback-ms trailer), or None without a usable one. Pass the error's
    ``trailing_metadata()``."""
    for key, value in trailing_metadata or ():
        if key == _RETRY_PUSHBACK_KEY and isinstance(value, str) and value.isdecimal():
            return int(value) / 1000
    return None


class GenerationClient:
    """One channel to a server at address ("host:port"). Calls raise grpc.RpcError, whose
    code() and details() say what went wrong (see serving.proto for the statuses), and whose
    trailing_metadata() may hold a retry hint (``pushback_s``).

    api_key: sent as ``authorization: Bearer <key>`` on every call. root_certificates (PEM):
    connect with TLS, trusting that CA (None with a client certificate: the system's roots);
    private_key / certificate_chain (PEM): the client's certificate, for mutual TLS."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, api_key: str | None = None,
                 root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None):
        self.address = address
        self._metadata = () if api_key is None else (("authorization", f"Bearer {api_key}"),)
        if root_certificates is None and certificate_chain is None:
            self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
        self._generation = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, request: pb.GenerateRequest, *, timeout_s: float | None = None) -> Iterator[pb.GenerateResponse]:
        """Stream the request's responses, the last with finished set. Stopping early (close()
        on the iterator, or dropping it) cancels the call, which aborts the request."""
        call = self._generation.Generate(request, timeout=timeout_s, metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()  # a no-op once the stream has ended

    def health(self, service: str = GENERATION_SERVICE, *, timeout_s: float = 5.0) -> int:
        """The service's HealthCheckResponse.ServingStatus."""
        request = health_pb2.HealthCheckRequest(service=service)
        return self._health.Check(request, timeout=timeout_s).status

    def wait_ready(self, timeout_s: float) -> None:
        """Block until Generation reports SERVING; TimeoutError after timeout_s seconds (a
        server that is not listening yet counts as not ready)."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.address} was not ready after {timeout_s:g} s ({last})")
            try:
                status = self.health(timeout_s=remaining)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as error:
                if not isinstance(error, grpc.Call) or error.code() not in (
                    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED
                ):
                    raise
                last = f"{error.code().name}: {error.details()}"
            time.sleep(min(_READY_POLL_S, max(deadline - time.monotonic(), 0)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
