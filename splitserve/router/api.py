"""The router's contract with its front ends (gRPC now, OpenAI HTTP next).

A front end turns a wire request into a ``GenerateInput``, iterates ``Frontend.generate`` and
turns each ``GenerateDelta`` back into a wire message. Errors map to statuses by type:

- ``ValueError``: the request is bad (empty or too long prompt, bad sampling params, unknown
  model name, bad messages) -> gRPC INVALID_ARGUMENT / HTTP 400.
- ``CapacityError``: nothing can take the request now -> RESOURCE_EXHAUSTED / HTTP 429.
- ``ServingError``: the request was accepted but failed (a worker died, the KV handoff failed
  after retries, the server is shutting down) -> UNAVAILABLE / HTTP 503.

``generate`` raises the input errors before its first yield. Closing the iterator early
(``aclose``, or cancelling the task that iterates it) aborts the request and frees its blocks
on every worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import CapacityError, ServingError

__all__ = ["SLO", "CapacityError", "Frontend", "GenerateDelta", "GenerateInput", "RequestReport", "ServingError"]


@dataclass(frozen=True)
class SLO:
    """Latency targets of one request, in seconds (None: no target)."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"slo {name} must be positive when given, got {value!r}")


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


@dataclass(frozen=True)
class RequestReport:
    """How a finished request was served (the router fills it on the last delta); seconds."""

    prefill_worker: str = ""
    decode_worker: str = ""
    k_history: tuple[int, ...] = ()
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    decode_s: float = 0.0
    handoff_attempts: int = 0

    def wire_fields(self) -> dict[str, Any]:
        """The report by the field names of serving.proto's RequestReport, which both front ends
        send (gRPC in that message, HTTP as the last chunk's ``splitserve_report``)."""
        return {
            "prefill_worker": self.prefill_worker, "decode_worker": self.decode_worker,
            "k_history": list(self.k_history), "draft_tokens": self.num_draft_tokens,
            "accepted_tokens": self.num_accepted_tokens, "queue_s": self.queue_s, "prefill_s": self.prefill_s,
            "transfer_s": self.transfer_s, "decode_s": self.decode_s, "handoff_attempts": self.handoff_attempts,
        }


@dataclass(frozen=True)
class GenerateDelta:
    """What one streamed message carries: the tokens and text added since the last one."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # so far, this delta included
    num_draft_tokens: int = 0  # speculation counters so far (0 without speculation)
    num_accepted_tokens: int = 0
    report: RequestReport | None = None  # on the last delta of a request the router completed


class Frontend(Protocol):
    """What a front end needs from the router."""

    @property
    def model_name(self) -> str:
        """The name clients may pass as ``model``."""

    def is_ready(self) -> bool:
        """True when every worker is up and requests can be served (health SERVING)."""

    def generate(self, request: GenerateInput) -> AsyncIterator[GenerateDelta]:
        """Stream a request's output; see the module docstring for errors and cancellation."""
