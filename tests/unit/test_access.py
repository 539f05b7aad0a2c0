"""API keys and TLS on both front ends, over real sockets: every HTTP route and the gRPC
services with no key, a wrong key and the right one (health and liveness open); TLS and mutual
TLS with certificates this test makes; a plaintext client against a TLS port fails; files the
server cannot use fail its start with a sentence naming them."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from splitserve.config import AccessConfig
from splitserve.router.access import is_authorized
from splitserve.router.client import GENERATION_SERVICE, GenerationClient, make_request
from splitserve.router.grpc_server import GrpcServer
from splitserve.router.http_server import HttpServer
from tests.pki import make_pki
from tests.unit.frontend_helpers import MODEL_NAME, LoopThread, OneTokenFrontend

KEY = "sk-test-7f3a"


@pytest.mark.parametrize(("keys", "header", "allowed"), [
    ((), None, True), ((KEY,), None, False), ((KEY,), "", False), ((KEY,), f"Bearer {KEY}", True),
    ((KEY,), f"bearer {KEY}", True), ((KEY,), f"Bearer {KEY}x", False), ((KEY,), KEY, False),
    (("other", KEY), f"Bearer {KEY}", True), ((KEY,), "Basic abc", False), ((KEY,), "Bearer ", False),
])
def test_a_call_needs_one_of_the_keys_as_a_bearer_token(keys, header, allowed):
    assert is_authorized(keys, header) is allowed


@pytest.mark.parametrize("kwargs", [{"api_keys": ("",)}, {"api_keys": ("a b",)}, {"ssl_certfile": "c.pem"},
                                    {"ssl_keyfile": "k.pem"}, {"ssl_ca_certs": "ca.pem"}])
def test_bad_access_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        AccessConfig(**kwargs)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


def _start(loop: LoopThread, access: AccessConfig) -> tuple[HttpServer, GrpcServer, int, int]:
    frontend = OneTokenFrontend()
    http_server, grpc_server = HttpServer(frontend, access=access), GrpcServer(frontend, access=access)
    return http_server, grpc_server, loop.run(http_server.start("127.0.0.1", 0)), \
        loop.run(grpc_server.start("127.0.0.1", 0))


def _stop(loop: LoopThread, *servers) -> None:
    for server in servers:
        loop.run(server.stop(0.1))


def _http(port: int, method: str, path: str, token: str | None = None, context: ssl.SSLContext | None = None):
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30) if context else \
        http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    body = {"/v1/completions": {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 1},
            "/v1/chat/completions": {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]}}.get(path)
    connection.request(method, path, None if body is None else json.dumps(body), headers)
    response = connection.getresponse()
    result = response.status, response.getheader("WWW-Authenticate"), response.read()
    connection.close()
    return result


ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
          ("GET", "/metrics")]


def test_with_api_keys_every_route_but_health_needs_one(loop):
    http_server, grpc_server, http_port, grpc_port = _start(loop, AccessConfig(api_keys=("other", KEY)))
    try:
        for method, path in ROUTES:
            for token in (None, "wrong"):
                status, challenge, body = _http(http_port, method, path, token)
                assert (status, challenge) == (401, "Bearer"), (path, token)
                assert json.loads(body)["error"]["code"] == "invalid_api_key"
            assert _http(http_port, method, path, KEY)[0] == 200, path
        for path in ("/health", "/livez"):
            assert _http(http_port, "GET", path)[0] == 200

        address = f"127.0.0.1:{grpc_port}"
        for key in (None, "wrong"):
            with GenerationClient(address, api_key=key) as client:
                with pytest.raises(grpc.RpcError) as error:
                    list(client.generate(make_request("Hi", max_tokens=1), timeout_s=30))
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "Bearer" in error.value.details()
                assert client.health() == health_pb2.HealthCheckResponse.SERVING  # health stays open
        with GenerationClient(address, api_key=KEY) as client:
            assert [t for r in client.generate(make_request("Hi", max_tokens=1), timeout_s=30) for t in r.token_ids] \
                == [1]
            assert client.health(GENERATION_SERVICE) == health_pb2.HealthCheckResponse.SERVING
    finally:
        _stop(loop, http_server, grpc_server)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tls_and_mutual_tls_on_both_front_ends(loop, pki, mutual):
    access = AccessConfig(ssl_certfile=str(pki["server.pem"]), ssl_keyfile=str(pki["server.key"]),
                          ssl_ca_certs=str(pki["ca.pem"]) if mutual else None)
    http_server, grpc_server, http_port, grpc_port = _start(loop, access)
    ca, client_pem, client_key = (pki[n].read_bytes() for n in ("ca.pem", "client.pem", "client.key"))
    try:
        trusting = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        with_certificate = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        with_certificate.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
        assert _http(http_port, "POST", "/v1/completions", context=with_certificate)[0] == 200
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):  # plaintext against TLS
            _http(http_port, "GET", "/health")
        if mutual:  # no client certificate: the handshake (or the first read) fails
            with pytest.raises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
                _http(http_port, "GET", "/health", context=trusting)
        else:
            assert _http(http_port, "GET", "/health", context=trusting)[0] == 200

        address = f"localhost:{grpc_port}"
        with GenerationClient(address, root_certificates=ca, private_key=client_key,
                              certificate_chain=client_pem) as client:
            assert [t for r in client.generate(make_request("Hi", max_tokens=1), timeout_s=30) for t in r.token_ids] \
                == [1]
        clients = [GenerationClient(address)] + ([GenerationClient(address, root_certificates=ca)] if mutual else [])
        for client in clients:  # plaintext; or TLS without a client certificate where one is required
            with client, pytest.raises(grpc.RpcError) as error:
                list(client.generate(make_request("Hi", max_tokens=1), timeout_s=10))
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        _stop(loop, http_server, grpc_server)


def test_tls_files_the_server_cannot_use_fail_its_start_with_a_sentence(loop, pki, tmp_path):
    missing = AccessConfig(ssl_certfile=str(tmp_path / "nope.pem"), ssl_keyfile=str(pki["server.key"]))
    (tmp_path / "junk.pem").write_text("not a certificate")
    junk = AccessConfig(ssl_certfile=str(tmp_path / "junk.pem"), ssl_keyfile=str(pki["server.key"]))
    for access, match in ((missing, "cannot read the ssl_certfile .*nope.pem"), (junk, "cannot use the TLS files")):
        with pytest.raises(ValueError, match=match):
            loop.run(HttpServer(OneTokenFrontend(), access=access).start("127.0.0.1", 0))
    with pytest.raises(ValueError, match="cannot read the ssl_certfile"):
        loop.run(GrpcServer(OneTokenFrontend(), access=missing).start("127.0.0.1", 0))
