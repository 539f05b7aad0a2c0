"""The messages workers and routers exchange: one import path for each type both sides speak.

Workers produce ``GenerateDelta`` (a request's streamed progress), ``KVDestination`` (where a
decode worker reserved blocks for a prompt's KV), ``PrefillResult`` (a prompt's first token
once its KV landed at the decode worker) and ``WorkerStatus``; routers add the
``RequestReport`` to a request's last delta and judge requests by their ``SLO``;
``SpeculationLimits`` is what a worker publishes about its speculation for the router's
controller; a ``StreamLease`` names the router a worker streams a request to and how long that
router's silence is tolerated. The errors they raise are in ``splitserve.errors``. Nothing here knows Ray, gRPC
or the engine, and holds no tensors: these are plain dataclasses that travel through Ray's
serialization (a router process unpickles them without torch) and are translated to protobuf
only at the front ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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
    placement: str = ""  # where the prefill ran: "remote", "local" ("" in colocated mode)
    predicted_ttft_s: float = 0.0  # what placement predicted (0: nothing was predicted)
    predicted_tpot_s: float = 0.0
    ttft_s: float = 0.0  # observed by the router, from the placement decision
    tpot_s: float = 0.0  # mean over the tokens after the first (0 with fewer than two)
    migrations: int = 0  # times it moved to another worker after the one running it died

    def wire_fields(self) -> dict[str, Any]:
        """The report by the field names of serving.proto's RequestReport, which both front ends
        send (gRPC in that message, HTTP as the last chunk's ``splitserve_report``)."""
        return {
            "prefill_worker": self.prefill_worker, "decode_worker": self.decode_worker,
            "k_history": list(self.k_history), "draft_tokens": self.num_draft_tokens,
            "accepted_tokens": self.num_accepted_tokens, "queue_s": self.queue_s, "prefill_s": self.prefill_s,
            "transfer_s": self.transfer_s, "decode_s": self.decode_s, "handoff_attempts": self.handoff_attempts,
            "placement": self.placement, "predicted_ttft_s": self.predicted_ttft_s,
            "predicted_tpot_s": self.predicted_tpot_s, "ttft_s": self.ttft_s, "tpot_s": self.tpot_s,
            "migrations": self.migrations,
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
    generator_state: bytes | None = None  # a seeded request's sampler state after these tokens


@dataclass(frozen=True)
class KVDestination:
    """Where one request's prompt K/V go: a decode worker's receiver and the blocks it reserved.

    start_token: the first prompt position whose K/V must be sent. The decode worker already
    holds the positions before it (a prefix of whole blocks from its own prefix cache, shared
    with other requests there), so only the prompt's tail travels.
    """

    worker_id: str
    backend: str  # "collective" or "grpc"
    endpoint: str
    block_ids: tuple[int, ...]  # the request's block table on the decode worker
    codec: str = "raw"
    start_token: int = 0
    lease_s: float = 0.0  # the reservation lapses this long after its last renewal (0: it never does)

    def __post_init__(self) -> None:
        if isinstance(self.start_token, bool) or not isinstance(self.start_token, int) or self.start_token < 0:
            raise ValueError(f"start_token must be an integer >= 0, got {self.start_token!r}")


@dataclass(frozen=True)
class StreamLease:
    """The router a worker streams a request to (``owner``: one id per router process) and
    the lease it holds the request under: a worker that hears nothing from that owner for
    ``lease_s`` (``Worker.renew_streams``, which the router calls every third of it) aborts the
    owner's requests, since a dead router's streams have no reader."""

    owner: str
    lease_s: float

    def __post_init__(self) -> None:
        if not self.owner or not 0 < self.lease_s < float("inf"):
            raise ValueError(f"a stream lease needs an owner and a positive, finite lease_s, got {self}")


@dataclass(frozen=True)
class PrefillResult:
    """A prompt's first token and what its prefill cost.

    text: the first token's text as the request's stream shows it (a possible stop-string
    prefix held back). finished: the first token already ended the request (EOS, a stop, or
    max_tokens 1): nothing is left for the decode worker. generator_state: a seeded request's
    sampler RNG state (the generator's state tensor as bytes), for the decode worker to
    continue the same random stream.
    """

    request_id: str
    first_token_id: int
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    generator_state: bytes | None
    prefill_s: float  # from arrival to the first token, queueing included
    handoff_wait_s: float  # after the first token, until the last chunk was acknowledged
    num_kv_chunks: int
    num_kv_bytes: int  # on the wire: the prompt's K/V from the destination's start_token on
    num_kv_resends: int


@dataclass(frozen=True)
class WorkerStatus:
    """What a worker reports once ready, and on request (tests check idleness with it)."""

    worker_id: str
    kind: str
    max_model_len: int
    num_free_blocks: int
    num_total_blocks: int
    num_unfinished: int  # running, waiting and reserved requests

    @property
    def is_idle(self) -> bool:
        return self.num_unfinished == 0 and self.num_free_blocks == self.num_total_blocks


@dataclass(frozen=True)
class SpeculationLimits:
    """A worker's speculation as its router's controller needs it: the most drafts a request
    may get (0: no proposer) and the k a request gets when nobody chose one. Published in the
    MetadataStore under ``NAME`` as a record of floats, like the latency models."""

    k_max: int
    k_default: int

    NAME = "speculation"

    def to_record(self) -> dict[str, float]:
        return {"k_max": float(self.k_max), "k_default": float(self.k_default)}

    @classmethod
    def from_record(cls, record: Mapping[str, float]) -> SpeculationLimits:
        return cls(int(record.get("k_max", 0)), int(record.get("k_default", 0)))
