"""Streaming clients of a load test: each sends one ``RequestSpec`` and fills its ``RequestRecord``.

``make_client(target)`` picks the client from the target's scheme:

- ``grpc://HOST:PORT``: splitserve's Generation service (grpc.aio). Every response's
  ``token_ids`` are that chunk's tokens; the last response's ``RequestReport`` (workers, k
  history, drafts, phase times) goes into ``record.server``.
- ``http://HOST:PORT/v1`` (or https): any OpenAI-compatible server (splitserve, vLLM, SGLang...),
  streaming POST /v1/completions over aiohttp.

Both send the prompt as text with ``max_tokens``, ``ignore_eos`` (so the server produces every
token asked for) and temperature 0. A client is an async context manager: entering it connects
(and, over HTTP without a model name, asks GET /v1/models for one) and raises ``TargetError``
with a sentence when the server cannot be reached. ``send`` raises ``RequestFailed`` for a
request the server refused or failed, with the server's retry hint when a refusal carries one
(gRPC ``grpc-retry-pushback-ms``, HTTP ``Retry-After`` in seconds); the runner owns deadlines
and cancellation.

Counting tokens over HTTP: OpenAI's chunks carry text, not token ids. With
``stream_options.continuous_usage_stats`` (vLLM's extension, also splitserve's) every chunk
carries the usage so far, and a chunk's tokens are the increase of ``completion_tokens``. A
server without it gets 1 token per chunk with text; the final usage chunk's total then corrects
the count, the difference going to the last chunks, so TTFT, TPOT and the output length are
exact and only the split of tokens between chunks is estimated.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import grpc

from splitserve.loadtest.records import Chunk, RequestRecord, RequestSpec, Status
from splitserve.protos.splitserve.v1 import serving_pb2 as pb
from splitserve.protos.splitserve.v1 import serving_pb2_grpc as pb_grpc
from splitserve.router.client import make_request, pushback_s

Clock = Callable[[], float]
"""Seconds since the run's start, on a monotonic clock."""

DEFAULT_CONNECT_TIMEOUT_S = 30.0


class TargetError(Exception):
    """The target cannot be used: it does not answer, or lists no model."""


class RequestFailed(Exception):
    """The server refused (status "refused") or failed (status "failed") a request; the
    message is the server's sentence, retry_after_s its retry hint in seconds (None: none)."""

    def __init__(self, status: Status, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class Client(Protocol):
    """What the runner needs from a client: enter it, ``send`` many requests concurrently, exit."""

    target: str
    model: str | None

    async def __aenter__(self) -> Client: ...

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None: ...

    async def send(self, spec: RequestSpec, record: RequestRecord, clock: Clock) -> None:
        """Stream one request, appending a Chunk per message with tokens to record.chunks."""


def make_client(target: str, *, model: str | None = None, api_key: str | None = None,
                timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, slo_ttft_ms: float | None = None,
                slo_tpot_ms: float | None = None) -> Client:
    """The client for target (``grpc://HOST:PORT`` or ``http(s)://HOST:PORT[/v1]``).

    timeout_s bounds connecting at the start (and the model list). slo_ttft_ms/slo_tpot_ms,
    when given, are sent with every request (the gRPC SLO field; HTTP ``slo_ttft_ms`` and
    ``slo_tpot_ms``, which only splitserve reads). ValueError for a target it cannot parse.
    """
    parts = urlsplit(target)
    if parts.scheme == "grpc" and parts.hostname and parts.port and parts.path in ("", "/"):
        return GrpcClient(target, parts.netloc, model=model, timeout_s=timeout_s,
                          slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, api_key=api_key)
    if parts.scheme in ("http", "https") and parts.hostname:
        base_url = target.rstrip("/") if parts.path.strip("/") else f"{target.rstrip('/')}/v1"
        return OpenAIClient(target, base_url, model=model, api_key=api_key, timeout_s=timeout_s,
                            slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms)
    raise ValueError(f"target must be grpc://HOST:PORT or http(s)://HOST:PORT/v1, got {target!r}")


# ------------------------------------------------------------------------------- gRPC


class GrpcClient:
    """splitserve's Generation service over one grpc.aio channel.

    num_speculative_tokens: pin every request's k (None: the server chooses). keep_outputs:
    keep each request's output token ids (``take_outputs``), for greedy-output checks. api_key:
    sent as ``authorization: Bearer <key>`` metadata.
    """

    def __init__(self, target: str, address: str, *, model: str | None, timeout_s: float,
                 slo_ttft_ms: float | None, slo_tpot_ms: float | None, num_speculative_tokens: int | None = None,
                 keep_outputs: bool = False, api_key: str | None = None):
        self.target, self.model = target, model
        self._metadata = () if api_key is None else (("authorization", f"Bearer {api_key}"),)
        self._address, self._timeout_s = address, timeout_s
        self._slo_ttft_ms, self._slo_tpot_ms = slo_ttft_ms, slo_tpot_ms
        self.num_speculative_tokens = num_speculative_tokens
        self._outputs: dict[int, list[int]] | None = {} if keep_outputs else None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GenerationStub | None = None

    async def __aenter__(self) -> GrpcClient:
        self._channel = grpc.aio.insecure_channel(self._address)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), self._timeout_s)
        except TimeoutError:
            await self._channel.close()
            raise TargetError(f"cannot reach {self.target}: no connection within {self._timeout_s:g} s") from None
        self._stub = pb_grpc.GenerationStub(self._channel)  # type: ignore[no-untyped-call]
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def send(self, spec: RequestSpec, record: RequestRecord, clock: Clock) -> None:
        assert self._stub is not None, "enter the client (async with) before sending"
        request = make_request(spec.prompt, model=self.model or "", max_tokens=spec.max_tokens, temperature=0.0,
                               ignore_eos=True, ttft_ms=self._slo_ttft_ms, tpot_ms=self._slo_tpot_ms,
                               num_speculative_tokens=self.num_speculative_tokens)
        call = self._stub.Generate(request, metadata=self._metadata)
        ids: list[int] = []
        if self._outputs is not None:
            self._outputs[spec.index] = ids
        last: pb.GenerateResponse | None = None
        try:
            async for response in call:
                if response.token_ids:
                    record.chunks.append(Chunk(clock(), len(response.token_ids)))
                    ids.extend(response.token_ids)
                last = response
        except grpc.aio.AioRpcError as error:
            status: Status = "refused" if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "failed"
            raise RequestFailed(status, f"{error.code().name}: {error.details()}",
                                pushback_s(error.trailing_metadata())) from None
        finally:
            call.cancel()  # a no-op once the stream has ended; aborts the request when cancelled
        if last is None or not last.finished:
            raise RequestFailed("failed", "the stream ended before the request finished")
        record.server = served_report(last)
        if last.finish_reason == "abort":
            raise RequestFailed("failed", "the server aborted the request")

    def take_outputs(self, num_requests: int) -> list[list[int]]:
        """The output token ids of the requests sent since the last call, by index ([] for one
        never sent), and forget them (with ``keep_outputs``)."""
        assert self._outputs is not None, "construct the client with keep_outputs=True"
        outputs = [self._outputs.get(index, []) for index in range(num_requests)]
        self._outputs.clear()
        return outputs


def served_report(last: pb.GenerateResponse) -> dict[str, Any]:
    """What the last response says about how the request was served: the RequestReport's
    fields (by their proto names), the prompt's token count and the finish reason."""
    report = last.report
    fields = {f.name: getattr(report, f.name) for f in report.DESCRIPTOR.fields}
    fields["k_history"] = list(fields["k_history"])
    return fields | {"prompt_tokens": last.usage.prompt_tokens, "finish_reason": last.finish_reason}


# ------------------------------------------------------------------------------- HTTP


class OpenAIClient:
    """Any OpenAI-compatible server's streaming /v1/completions over one aiohttp session."""

    def __init__(self, target: str, base_url: str, *, model: str | None, api_key: str | None, timeout_s: float,
                 slo_ttft_ms: float | None, slo_tpot_ms: float | None):
        self.target, self.model = target, model
        self._base_url, self._api_key, self._timeout_s = base_url, api_key, timeout_s
        self._slo = {name: value for name, value in (("slo_ttft_ms", slo_ttft_ms), ("slo_tpot_ms", slo_tpot_ms))
                     if value is not None}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAIClient:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        # No total timeout: the runner bounds each request; only connecting is bounded here.
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout_s)
        # Unlimited connections: a load test must not queue its requests on the client side.
        connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector)
        if self.model is None:
            try:
                self.model = await self._first_model()
            except BaseException:
                await self._session.close()
                raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()

    async def _first_model(self) -> str:
        assert self._session is not None
        url = f"{self._base_url}/models"
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=self._timeout_s)) as response:
                body = await response.json(content_type=None)
                if response.status != 200:
                    raise TargetError(f"GET {url} answered {response.status}: {_error_message(body)}")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise TargetError(f"cannot reach {url}: {error or type(error).__name__}") from None
        models = body.get("data") if isinstance(body, dict) else None
        if not models or not isinstance(models[0], dict) or not isinstance(models[0].get("id"), str):
            raise TargetError(f"GET {url} lists no model; give one with --model")
        return str(models[0]["id"])

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        """The /v1/completions request for spec."""
        return {
            "model": self.model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        } | self._slo

    async def send(self, spec: RequestSpec, record: RequestRecord, clock: Clock) -> None:
        assert self._session is not None, "enter the client (async with) before sending"
        try:
            async with self._session.post(f"{self._base_url}/completions", json=self.body(spec)) as response:
                if response.status != 200:
                    raise _status_error(response.status, await response.text(), response.headers.get("Retry-After"))
                await _read_stream(_sse_events(response.content), record, clock)
        except (aiohttp.ClientError, ConnectionError) as error:
            raise RequestFailed("failed", f"{type(error).__name__}: {error}") from None


async def _read_stream(events: AsyncIterator[dict[str, Any]], record: RequestRecord, clock: Clock) -> None:
    """Chunks from the SSE events into record; the final usage corrects the token count."""
    counted, total, finish_reason = 0, None, None
    async for event in events:
        now = clock()
        if "error" in event:
            raise RequestFailed("failed", _error_message(event))
        choices, so_far = event.get("choices") or [], _completion_tokens(event)
        if not choices:  # the usage chunk, after the last token chunk
            total = so_far if so_far is not None else total
            continue
        tokens = so_far - counted if so_far is not None else int(bool(choices[0].get("text")))
        if tokens > 0:
            record.chunks.append(Chunk(now, tokens))
            counted += tokens
        finish_reason = choices[0].get("finish_reason") or finish_reason
        if isinstance(event.get("splitserve_report"), dict):  # splitserve's HTTP front end
            record.server = event["splitserve_report"]
    if finish_reason is None:
        raise RequestFailed("failed", "the stream ended before the request finished")
    if total is not None:
        record.chunks[:] = with_total(record.chunks, total)
    if record.server:
        record.server |= {"finish_reason": finish_reason}
    if finish_reason == "abort":
        raise RequestFailed("failed", "the server aborted the request")


def _completion_tokens(event: dict[str, Any]) -> int | None:
    usage = event.get("usage")
    count = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return count if isinstance(count, int) else None


def with_total(chunks: list[Chunk], total: int) -> list[Chunk]:
    """chunks with their token counts corrected to the server's total: the difference goes to
    the last chunk (more tokens), or is taken from the last chunks (fewer); empty chunks go."""
    fixed, missing = list(chunks), total - sum(c.tokens for c in chunks)
    for i in reversed(range(len(fixed))):
        if missing == 0:
            break
        tokens = max(fixed[i].tokens + missing, 0)
        missing -= tokens - fixed[i].tokens
        fixed[i] = Chunk(fixed[i].t, tokens)
    return [c for c in fixed if c.tokens]


async def _sse_events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of an SSE stream's ``data:`` lines, until ``[DONE]``."""
    async for raw in content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise RequestFailed("failed", f"the server sent an event that is not JSON: {data[:200]!r}") from None
        if not isinstance(event, dict):
            raise RequestFailed("failed", f"the server sent an event that is not an object: {data[:200]!r}")
        yield event


def _status_error(status: int, text: str, retry_after: str | None = None) -> RequestFailed:
    """429 is a refusal (capacity); any other error status a failure. retry_after: the
    Retry-After header, read when it is delay-seconds (an HTTP date is ignored)."""
    try:
        message = _error_message(json.loads(text))
    except ValueError:
        message = text.strip()[:500] or "no body"
    retry_after_s = float(retry_after) if retry_after is not None and retry_after.isdecimal() else None
    return RequestFailed("refused" if status == 429 else "failed", f"HTTP {status}: {message}", retry_after_s)


def _error_message(body: Any) -> str:
    """The message of an OpenAI error body ({"error": {"message": ...}}; vLLM also sends
    {"message": ...}), else the body itself."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return json.dumps(body)[:500]
