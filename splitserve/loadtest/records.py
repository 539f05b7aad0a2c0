"""What a load test sends and what it records: the contract between the workload generator,
the clients that stream from a server, and the scoring.

Times in a RequestRecord are seconds on the run's monotonic clock, counted from the run's
start, so records from one run line up and a JSONL file of them can be re-scored later.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["ok", "refused", "failed"]
"""ok: the stream ended normally. refused: the server turned the request away for capacity
(gRPC RESOURCE_EXHAUSTED, HTTP 429). failed: anything else (an error status, a broken stream,
the client's own deadline). Refused and failed requests count as SLO misses."""


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload, generated offline before the run."""

    index: int
    prompt: str              # real text; its token count with the target's tokenizer is prompt_tokens
    prompt_tokens: int
    max_tokens: int          # output length asked for; sent with ignore_eos so the server produces it all
    category: str = ""       # the workload it came from: "chat", "code", "fixed", "prefix", "file"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestSpec:
        return cls(**data)


@dataclass(frozen=True)
class Chunk:
    """One streamed message: when it arrived and how many output tokens it carried
    (speculative decoding can put several tokens in one message)."""

    t: float
    tokens: int


@dataclass
class RequestRecord:
    """Everything measured about one request."""

    index: int
    scheduled_s: float                    # when the arrival process said to send it
    sent_s: float                         # when it was sent
    prompt_tokens: int
    max_tokens: int
    status: Status = "ok"
    error: str = ""                       # the server's or client's sentence when status != "ok"
    retry_after_s: float | None = None    # a refusal's retry hint (gRPC pushback, HTTP Retry-After); None: none
    chunks: list[Chunk] = field(default_factory=list)
    finished_s: float | None = None       # when the stream ended (ok or not)
    server: dict[str, Any] = field(default_factory=dict)  # what the server reported: worker ids, phase times, k

    @property
    def output_tokens(self) -> int:
        return sum(c.tokens for c in self.chunks)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["chunks"] = [[c.t, c.tokens] for c in self.chunks]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        data = dict(data)
        data["chunks"] = [Chunk(float(t), int(n)) for t, n in data.get("chunks", [])]
        return cls(**data)


def write_jsonl(path: Path, records: Iterable[RequestRecord]) -> None:
    with path.open("w") as out:
        for record in records:
            out.write(json.dumps(record.to_dict(), separators=(",", ":")) + "\n")


def read_jsonl(path: Path) -> list[RequestRecord]:
    return list(_read(path))


def _read(path: Path) -> Iterator[RequestRecord]:
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield RequestRecord.from_dict(json.loads(line))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{number}: not a request record: {e}") from None
