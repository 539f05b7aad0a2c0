"""The router's contract with its front ends (gRPC and OpenAI HTTP).

A front end turns a wire request into a ``GenerateInput``, iterates ``Frontend.generate`` and
turns each ``GenerateDelta`` (splitserve.protocol) back into a wire message. Errors
(splitserve.errors) map to statuses by type:

- ``ValueError``: the request is bad (empty or too long prompt, bad sampling params, unknown
  model name, bad messages) -> gRPC INVALID_ARGUMENT / HTTP 400.
- ``CapacityError``: nothing can take the request now -> RESOURCE_EXHAUSTED / HTTP 429; its
  ``retry_after_s``, when set, goes out as the ``grpc-retry-pushback-ms`` trailer / ``Retry-After``.
- ``ServingError``: the request was accepted but failed (a worker died, the KV handoff failed
  after retries, the server is shutting down) -> UNAVAILABLE / HTTP 503.

``generate`` raises the input errors before its first yield. Closing the iterator early
(``aclose``, or cancelling the task that iterates it) aborts the request and frees its blocks
on every worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from splitserve.engine.sampling_params import SamplingParams
from splitserve.protocol import SLO, GenerateDelta


@dataclass(frozen=True)
class GenerateInput:
    """One request as the router sees it. Exactly one of prompt, prompt_token_ids, messages.

    messages: chat turns ({"role": ..., "content": ...}); the router applies the model's chat
    template. model: None or "" means the served model; another name is a ValueError.
    """

    params: SamplingParams
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    model: str | None = None
    request_id: str | None = None
    slo: SLO = field(default_factory=SLO)


class Frontend(Protocol):
    """What a front end needs from the router."""

    @property
    def model_name(self) -> str:
        """The name clients may pass as ``model``."""

    def is_ready(self) -> bool:
        """True when every worker is up and requests can be served (health SERVING)."""

    def generate(self, request: GenerateInput) -> AsyncIterator[GenerateDelta]:
        """Stream a request's output; see the module docstring for errors and cancellation."""
