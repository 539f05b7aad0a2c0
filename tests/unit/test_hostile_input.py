"""Hostile input at both front ends gets a clear status and leaves the server serving: an
oversized HTTP body (413) or gRPC message (RESOURCE_EXHAUSTED), stop lists past their bounds
(400 / INVALID_ARGUMENT), a seed no generator takes, many streams on one connection, and a
client that stops reading its stream (the request is given up after the send timeout)."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import time
from collections.abc import Iterator

import grpc
import pytest

from splitserve.router.client import GenerationClient, make_request
from splitserve.router.grpc_server import MAX_MESSAGE_BYTES, MAX_STREAMS_PER_CONNECTION, GrpcServer
from splitserve.router.http_server import MAX_REQUEST_BYTES, HttpServer
from tests.unit.frontend_helpers import MODEL_NAME, FloodFrontend, LoopThread, OneTokenFrontend


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[int, int]]:
    loop = LoopThread()
    http_server, grpc_server = HttpServer(OneTokenFrontend()), GrpcServer(OneTokenFrontend())
    ports = loop.run(http_server.start("127.0.0.1", 0)), loop.run(grpc_server.start("127.0.0.1", 0))
    yield ports
    for server in (http_server, grpc_server):
        loop.run(server.stop(0.1))
    loop.close()


def _post(port: int, body: bytes) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    result = response.status, json.loads(response.read() or b"{}")
    connection.close()
    return result


def _completion(**extra) -> bytes:
    return json.dumps({"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 1} | extra).encode()


@pytest.mark.parametrize(("extra", "status", "names"), [
    ({"prompt": "x" * (MAX_REQUEST_BYTES + 1)}, 413, ""),
    ({"stop": ["s"] * 65}, 400, "stop"),
    ({"stop": ["s" * 513]}, 400, "stop"),
    ({"seed": 2**64}, 400, "seed"),
])
def test_http_answers_hostile_requests_with_a_status_and_keeps_serving(served, extra, status, names):
    http_port, _ = served
    got, body = _post(http_port, _completion(**extra))
    assert got == status and body["error"]["message"] and names in body["error"]["message"]
    assert _post(http_port, _completion())[0] == 200


def test_grpc_answers_hostile_requests_with_a_status_and_keeps_serving(served):
    _, grpc_port = served
    with GenerationClient(f"127.0.0.1:{grpc_port}") as client:
        for request, code in ((make_request("x" * (MAX_MESSAGE_BYTES + 1), max_tokens=1),
                               grpc.StatusCode.RESOURCE_EXHAUSTED),
                              (make_request("Hi", max_tokens=1, stop=["s"] * 65), grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as error:
                list(client.generate(request, timeout_s=60))
            assert error.value.code() == code and error.value.details()
        assert [t for r in client.generate(make_request("Hi", max_tokens=1), timeout_s=60) for t in r.token_ids] == [1]


def test_more_streams_on_one_connection_than_it_runs_at_once_all_complete(served):
    _, grpc_port = served
    with GenerationClient(f"127.0.0.1:{grpc_port}") as client, \
            concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda _: [t for r in client.generate(make_request("Hi", max_tokens=1), timeout_s=60)
                                           for t in r.token_ids], range(2 * MAX_STREAMS_PER_CONNECTION)))
    assert results == [[1]] * (2 * MAX_STREAMS_PER_CONNECTION)


@pytest.fixture(scope="module")
def flooded() -> Iterator[tuple[FloodFrontend, int, int]]:
    """Both front ends over a FloodFrontend, giving a client that takes nothing half a second."""
    loop, frontend = LoopThread(), FloodFrontend()
    http_server, grpc_server = HttpServer(frontend, send_timeout_s=0.5), GrpcServer(frontend, send_timeout_s=0.5)
    yield frontend, loop.run(http_server.start("127.0.0.1", 0)), loop.run(grpc_server.start("127.0.0.1", 0))
    for server in (http_server, grpc_server):
        loop.run(server.stop(0.1))
    loop.close()


def _until_closed(frontend: FloodFrontend, count: int) -> None:
    deadline = time.monotonic() + 120
    while frontend.num_closed < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert frontend.num_closed >= count, "a stream whose client stopped reading was never given up"


def test_an_http_client_that_stops_reading_has_its_stream_given_up(flooded):
    frontend, http_port, _ = flooded
    closed = frontend.num_closed
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", http_port))
    body = _completion(max_tokens=100000, stream=True)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # ... and reads nothing
    _until_closed(frontend, closed + 1)
    sock.settimeout(60)  # the server closed the connection: what the kernel held reads out, then its end
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    sock.close()
    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
    connection.request("GET", "/health")
    assert connection.getresponse().status == 200  # and it serves on
    connection.close()


def test_a_grpc_client_that_stops_reading_has_its_stream_ended_deadline_exceeded(flooded):
    frontend, _, grpc_port = flooded
    closed = frontend.num_closed
    with GenerationClient(f"127.0.0.1:{grpc_port}") as client:
        responses = client.generate(make_request("Hi", max_tokens=100000), timeout_s=600)
        next(responses)  # the stream runs; then nothing more is read
        _until_closed(frontend, closed + 1)
        with pytest.raises(grpc.RpcError) as error:
            for _ in responses:
                pass
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "took no message" in error.value.details()
