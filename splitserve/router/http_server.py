"""The OpenAI-compatible HTTP front end over a ``Frontend`` (aiohttp).

``HttpServer`` serves POST /v1/completions and /v1/chat/completions (JSON, or SSE with
``stream: true``), GET /v1/models, /health (readiness: 200 while ``Frontend.is_ready``, else
503, as during start-up and drain), /livez (liveness: 200 while the process answers) and
/metrics (Prometheus text), so the ``openai`` client and ``vllm bench serve`` work unchanged.
The wire format lives in ``openai_protocol``; here is the I/O. Errors map to statuses by type as
``splitserve.router.api`` describes (400/429/503, 500 for bugs) with OpenAI's error body; a 429
whose CapacityError carries a retry hint also gets ``Retry-After``. An error after a stream has
begun is sent as an SSE ``error`` event before ``[DONE]``. The first output is awaited before
the response starts, so input errors still get their status (and headers). A client that
disconnects cancels its handler, which closes the frontend's iterator: the request is aborted;
so does one that takes no data for ``send_timeout_s`` while a write waits on it (its buffers
full: a client that stopped reading, or reads a byte a second), and its connection is closed --
a stalled reader holds nothing for longer than that.
With API keys configured every route but /health and /livez answers 401 without one; with
TLS files it serves HTTPS (mutual TLS with a CA bundle). The serve command starts it inside the
router's event loop, after the gRPC server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from splitserve.config import DEFAULT_SEND_TIMEOUT_S, AccessConfig
from splitserve.errors import CapacityError, ServingError
from splitserve.protocol import GenerateDelta
from splitserve.router.access import OPEN_HTTP_PATHS, UNAUTHENTICATED, is_authorized, server_ssl_context
from splitserve.router.api import Frontend, GenerateInput
from splitserve.router.metrics import CONTENT_TYPE, Metrics, observe_stream
from splitserve.router.openai_protocol import Reply, ReplyOptions, chat_input, completion_input, error_body

logger = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8000  # vLLM's, so clients configured for it need only the host
MAX_REQUEST_BYTES = 4 << 20  # a request body's bound (a context's worth of token ids is ~0.1 MiB of JSON)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"


def status_for_error(error: Exception) -> tuple[int, str]:
    """The HTTP status and message a failed request ends with (see splitserve.router.api)."""
    message = str(error) or type(error).__name__
    if isinstance(error, ValueError):
        return 400, message
    if isinstance(error, CapacityError):
        return 429, message
    if isinstance(error, ServingError):
        return 503, message
    return 500, f"the server failed on this request ({type(error).__name__}: {message})"


def headers_for_error(error: Exception) -> dict[str, str]:
    """The headers a failed request's answer carries besides its status: for a refusal with a
    retry hint, Retry-After in whole seconds (RFC 9110 delay-seconds), rounded up, at least 1."""
    if isinstance(error, CapacityError) and error.retry_after_s is not None:
        return {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    return {}


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(status, message), status=status, headers=headers)


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


@web.middleware
async def _errors_as_json(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Every error before a response starts becomes an OpenAI error body with its status (and
    headers_for_error's headers)."""
    try:
        return await handler(request)
    except web.HTTPException as error:  # unknown route, wrong method
        if error.status < 400:
            raise
        return error_response(error.status, error.reason)
    except Exception as error:
        status, message = status_for_error(error)
        if status == 500:
            logger.exception("%s %s failed", request.method, request.path)
        return error_response(status, message, headers_for_error(error))


def _api_keys(api_keys: tuple[str, ...]) -> Callable[[web.Request, _Handler], Awaitable[web.StreamResponse]]:
    """Without one of ``api_keys`` (if any) a request gets 401 with OpenAI's error body, but for
    the open health paths."""

    @web.middleware
    async def check(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path in OPEN_HTTP_PATHS or is_authorized(api_keys, request.headers.get("Authorization")):
            return await handler(request)
        return error_response(401, UNAUTHENTICATED, {"WWW-Authenticate": "Bearer"})

    return check


class HttpServer:
    """Serves the OpenAI API, health and metrics for one Frontend on an aiohttp server.

    metrics: where request metrics go and what /metrics shows (None: a Metrics of its own).
    access: API keys and TLS (``splitserve.router.access``; None: open, plain HTTP).
    Call ``start`` and ``stop`` from the event loop the frontend runs in.
    """

    def __init__(self, frontend: Frontend, metrics: Metrics | None = None, access: AccessConfig | None = None,
                 send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S):
        if not 0 < send_timeout_s < math.inf:
            raise ValueError(f"send_timeout_s must be positive and finite, got {send_timeout_s!r}")
        self._frontend = frontend
        self._send_timeout_s = send_timeout_s
        self.metrics = metrics if metrics is not None else Metrics()
        self._access = access or AccessConfig()
        self._runner: web.AppRunner | None = None
        self._active: set[asyncio.Task[Any]] = set()
        self._is_stopping = False
        self._created = int(time.time())
        self.port: int | None = None

    async def start(self, host: str = "127.0.0.1", port: int = DEFAULT_HTTP_PORT) -> int:
        """Listen on host:port (port 0 picks a free one) and serve; return the bound port."""
        assert self._runner is None, "HttpServer.start was already called"
        ssl_context = server_ssl_context(self._access)
        app = web.Application(middlewares=[_api_keys(self._access.api_keys), _errors_as_json],
                              client_max_size=MAX_REQUEST_BYTES)  # larger: 413 with an error body
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/metrics", self._metrics)
        # handler_cancellation: a client that disconnects cancels its handler, aborting the request.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        except OSError as error:
            await runner.cleanup()
            raise ValueError(f"cannot listen on {host}:{port}: {error}") from error
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        """Report 503 on /health and refuse new requests, give running ones grace_s seconds,
        then cancel them (which aborts their requests) and close the listener."""
        if self._runner is None:
            return
        self._is_stopping = True
        if self._active:
            _, pending = await asyncio.wait(set(self._active), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        await self._runner.cleanup()
        self._runner = None

    # ------------------------------------------------------------------------ handlers

    async def _health(self, request: web.Request) -> web.Response:
        if not self._is_stopping and self._frontend.is_ready():
            return web.Response(status=200)
        return error_response(503, "not ready")

    async def _livez(self, request: web.Request) -> web.Response:
        """The process is alive and its event loop answers (start-up and drain included): a
        liveness probe restarts only what is stuck, never what is starting or draining."""
        return web.Response(status=200)

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": self._frontend.model_name, "object": "model", "created": self._created,
                 "owned_by": "splitserve"}
        return web.json_response({"object": "list", "data": [model]})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, is_chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, is_chat=True)

    async def _generate(self, request: web.Request, is_chat: bool) -> web.StreamResponse:
        try:
            generate_input, options = await self._read_input(request, is_chat)
        except (ValueError, ServingError) as error:
            self.metrics.count_error(error)
            raise
        task = asyncio.current_task()
        assert task is not None, "aiohttp runs each handler in a task"
        self._active.add(task)
        stream = observe_stream(self.metrics, self._frontend.generate(generate_input))
        try:
            first = await anext(stream)  # raises the input errors, before any byte is sent
            reply = Reply(is_chat, first.request_id, generate_input.model or self._frontend.model_name,
                          int(time.time()), options.include_usage, options.continuous_usage)
            if options.stream:
                return await self._stream(request, reply, first, stream)
            return await self._whole(reply, first, stream)
        finally:
            self._active.discard(task)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()  # early (client left, stop): aborts the request now

    async def _read_input(self, request: web.Request, is_chat: bool) -> tuple[GenerateInput, ReplyOptions]:
        if self._is_stopping:
            raise ServingError("the server is shutting down")
        try:
            body = await request.json()
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"the request body is not valid JSON: {error}") from None
        return (chat_input if is_chat else completion_input)(body, request.headers.get("X-Request-Id"))

    async def _whole(self, reply: Reply, first: GenerateDelta, stream: AsyncIterator[GenerateDelta]) -> web.Response:
        texts, last = [first.text], first
        while not last.finished:
            delta = await anext(stream, None)
            if delta is None:
                raise ServingError(f"request {first.request_id}: the stream ended before the request finished")
            texts.append(delta.text)
            last = delta
        return web.json_response(reply.response("".join(texts), last))

    async def _stream(self, request: web.Request, reply: Reply, first: GenerateDelta,
                      stream: AsyncIterator[GenerateDelta]) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)

        async def send(data: bytes) -> None:
            """Write, or give the client up (ConnectionResetError) when it takes no data in time."""
            try:
                async with asyncio.timeout(self._send_timeout_s):  # in this task: a cancel reaches the write
                    await response.write(data)
            except TimeoutError:
                logger.warning("request %s: the client took no data for %g s; aborting it and closing the "
                               "connection", reply.request_id, self._send_timeout_s)
                self.metrics.count_error(ServingError("the client stopped reading"))
                if request.transport is not None:
                    request.transport.abort()
                raise ConnectionResetError("the client stopped reading") from None

        try:
            await self._write_events(send, reply, first, stream)
            await send(_DONE)
            await response.write_eof()
        except ConnectionResetError:  # the client left; _generate's close aborts the request
            pass
        return response

    async def _write_events(self, send: Callable[[bytes], Awaitable[None]], reply: Reply, first: GenerateDelta,
                            stream: AsyncIterator[GenerateDelta]) -> None:
        """A chunk per delta, then the usage chunk; an error ends the stream as an error event."""
        delta: GenerateDelta | None = first
        last = first
        try:
            while delta is not None:
                await send(_sse(reply.chunk(delta, is_first=delta is first)))
                last = delta
                delta = None if delta.finished else await anext(stream, None)
            if reply.include_usage:
                await send(_sse(reply.usage_chunk(last)))
        except ConnectionResetError:
            raise
        except Exception as error:
            status, message = status_for_error(error)
            if status == 500:
                logger.exception("request %s failed mid-stream", reply.request_id)
            await send(_sse(error_body(status, message)))
