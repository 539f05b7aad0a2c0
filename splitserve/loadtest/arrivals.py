"""When a load test sends its requests: open-loop arrival processes and the closed loop.

Open loop (``poisson``, ``gamma:CV``, ``constant``): send times are drawn up front from a seeded
generator at a given mean rate and kept whatever the server does, as vLLM's ``bench serve``
does, so a slow server builds a queue instead of slowing the load. The gaps between sends are
gamma-distributed with mean 1/rate and coefficient of variation CV (shape 1/CV^2): CV=1 is
Poisson (exponential gaps), larger is burstier (the Azure trace: chat ~1.09, code ~13), and
``constant`` is CV=0. ``trace``: the send times are the ``arrival_s`` of a ``file:PATH``
workload's lines (``Arrival.with_trace``, from ``workloads.resolve_trace``), replayed as recorded
without a rate, or with a rate scaled in time to that mean rate (every offset times the trace's
own mean rate / the rate), so a sweep over rates replays the same trace faster or slower. Closed
loop (``concurrency:N``): N requests in flight, each finished one replaced at once; there is no
rate and no send times (the runner drives it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, cast

import numpy as np

ArrivalKind = Literal["poisson", "gamma", "constant", "trace", "concurrency"]
USAGE = "poisson, gamma:CV, constant, trace or concurrency:N"


@dataclass(frozen=True)
class Arrival:
    """A parsed arrival process; `cv` is set for gamma, `concurrency` for concurrency, and
    `trace` (the recorded offsets, seconds) for a trace once its workload is read."""

    kind: ArrivalKind
    cv: float | None = None
    concurrency: int | None = None
    trace: tuple[float, ...] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind == "gamma" and not (self.cv is not None and 0 < self.cv < math.inf):
            raise ValueError(f"gamma arrivals need a CV > 0 (use constant for evenly spaced sends), got {self.cv}")
        if self.kind == "concurrency" and not (self.concurrency is not None and self.concurrency >= 1):
            raise ValueError(f"concurrency needs N >= 1 requests in flight, got {self.concurrency}")

    def with_trace(self, offsets: list[float] | tuple[float, ...]) -> Arrival:
        """This trace arrival with its recorded offsets (finite, >= 0, ascending)."""
        assert self.kind == "trace", "only a trace arrival takes recorded offsets"
        assert offsets and all(0 <= b - a < math.inf for a, b in zip([0.0, *offsets], offsets)), \
            "workloads.trace_offsets checks the offsets"
        return replace(self, trace=tuple(float(t) for t in offsets))

    def trace_rate(self, num_requests: int) -> float | None:
        """The mean rate of the trace's first num_requests sends, as ``offsets`` spaces them
        (num_requests - 1 gaps); None when it has none (one request, or all at one instant)."""
        assert self.trace is not None, "a trace arrival needs its offsets (with_trace) first"
        sends = self.trace[:num_requests]
        span = sends[-1] - sends[0]
        return (len(sends) - 1) / span if len(sends) > 1 and span > 0 else None

    @property
    def is_open_loop(self) -> bool:
        return self.kind != "concurrency"

    @property
    def gap_cv(self) -> float:
        """The coefficient of variation of the gaps between sends (open loop only)."""
        assert self.is_open_loop, "a closed loop has no drawn gaps"
        if self.kind == "gamma":
            assert self.cv is not None, "checked in __post_init__"
            return self.cv
        return 1.0 if self.kind == "poisson" else 0.0

    def offsets(self, rate: float | None, num_requests: int, seed: int = 0) -> list[float]:
        """Send times in seconds from the run's start, ascending, at a mean of `rate` per second.

        The first request goes at 0 and each later one a drawn gap after the one before, so the
        last is sent after num_requests - 1 gaps (vLLM's ``bench serve`` sends its first at once too).
        A trace gives its first num_requests recorded offsets: as recorded with rate None, else
        scaled in time to a mean of `rate` (see the module docstring); it draws nothing.
        """
        if not self.is_open_loop:
            raise ValueError(f"{self} is a closed loop: it has no send times, the runner keeps N in flight")
        if num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {num_requests}")
        if self.kind == "trace":
            return self._trace_offsets(rate, num_requests)
        if rate is None or not rate > 0:
            raise ValueError(f"the request rate must be > 0 per second, got {rate}")
        gaps = self._gaps(np.random.default_rng(seed), rate, max(num_requests - 1, 0))
        return [0.0, *np.cumsum(gaps).tolist()][:num_requests]

    def _trace_offsets(self, rate: float | None, num_requests: int) -> list[float]:
        if self.trace is None:
            raise ValueError("trace arrivals take their send times from a file:PATH workload's arrival_s")
        if num_requests > len(self.trace):
            raise ValueError(f"the trace has {len(self.trace)} requests, not {num_requests}")
        if rate is None:
            return list(self.trace[:num_requests])
        if not rate > 0:
            raise ValueError(f"the request rate must be > 0 per second, got {rate}")
        recorded = self.trace_rate(num_requests)
        if recorded is None:
            raise ValueError("the trace's requests all arrive at one instant: it has no rate to scale to "
                             f"{rate:g}/s (replay it as recorded, without a rate)")
        return [t * recorded / rate for t in self.trace[:num_requests]]

    def _gaps(self, rng: np.random.Generator, rate: float, size: int) -> np.ndarray:
        if self.kind == "constant":
            return np.full(size, 1.0 / rate)
        if self.kind == "poisson":
            return rng.exponential(1.0 / rate, size)
        shape = 1.0 / self.gap_cv**2
        return rng.gamma(shape, 1.0 / (rate * shape), size)  # mean shape*scale = 1/rate

    def __str__(self) -> str:
        if self.kind == "gamma":
            return f"gamma:{self.cv:g}"
        if self.kind == "concurrency":
            return f"concurrency:{self.concurrency}"
        return self.kind


def parse_arrival(text: str) -> Arrival:
    """An arrival process from its command-line name; ValueError if malformed."""
    kind, has_args, args = text.strip().partition(":")
    if kind in ("poisson", "constant", "trace"):
        if has_args:
            raise ValueError(f"arrival {text!r}: {kind} takes no arguments (the rate is set separately; a trace's "
                             "times are its file:PATH workload's arrival_s)")
        return Arrival(cast(ArrivalKind, kind))
    if kind == "gamma":
        try:
            return Arrival("gamma", cv=float(args))
        except ValueError:
            raise ValueError(f"arrival {text!r}: gamma:CV needs CV, a number > 0 (1 is Poisson)") from None
    if kind == "concurrency":
        if not args.strip().isdigit():
            raise ValueError(f"arrival {text!r}: concurrency:N needs N, a whole number >= 1")
        return Arrival("concurrency", concurrency=int(args))
    raise ValueError(f"unknown arrival {text!r}: expected {USAGE}")
