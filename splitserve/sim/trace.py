"""The requests a simulation serves: token counts and arrival times, from the load tester's
own workload specs and arrival processes, so a simulated run and a real ``splitserve loadtest``
run with the same workload, arrival, rate and seed see the same lengths at the same offsets.

Only lengths matter here, so no prompt text is written (``workloads.sample_lengths``); a
``file:`` workload must give ``prompt_tokens`` counts, since text has no token count without
the target's tokenizer. Only open-loop arrivals have a schedule to simulate; a ``trace``
replays a file's ``arrival_s``, scaled in time to each rate (``Arrival.offsets``), as the load
tester does.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.loadtest.arrivals import Arrival
from splitserve.loadtest.workloads import LengthLimits, WorkloadSpec, read_workload_file, resolve_trace, sample_lengths


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request of a simulated run: when it arrives (seconds from the start) and its lengths.
    ``output_tokens`` are all produced (the load tester sends with ignore_eos), the first by
    the prefill."""

    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"request {self.index}: needs >= 1 prompt and output token, got "
                             f"{self.prompt_tokens} and {self.output_tokens}")


def make_requests(spec: WorkloadSpec, arrival: Arrival, rate: float, num_requests: int, *, seed: int = 0,
                  scale: float = 1.0, limits: LengthLimits = LengthLimits()) -> list[SimRequest]:
    """``num_requests`` requests of ``spec`` arriving by ``arrival`` at ``rate`` per second,
    seeded as the load tester seeds them (one seed for lengths and arrival times)."""
    if not arrival.is_open_loop:
        raise ValueError(f"the simulator needs an open-loop arrival (poisson, gamma:CV, constant, trace), "
                         f"got {arrival}")
    arrival, num_requests = resolve_trace(arrival, spec, num_requests)  # a trace: its file's first lines
    lengths = _lengths(spec, num_requests, seed, scale, limits)
    offsets = arrival.offsets(rate, num_requests, seed)
    return [SimRequest(i, t, p, o) for i, (t, (p, o)) in enumerate(zip(offsets, lengths, strict=True))]


def _lengths(spec: WorkloadSpec, num_requests: int, seed: int, scale: float,
             limits: LengthLimits) -> list[tuple[int, int]]:
    if spec.kind != "file":
        return sample_lengths(spec, num_requests, seed=seed, scale=scale, limits=limits)
    assert spec.path is not None, "parse_workload sets the path"
    entries = read_workload_file(spec.path)
    for entry in entries:
        if entry.prompt_tokens is None:
            raise ValueError(f"{entry.where}: the simulator needs \"prompt_tokens\" (a count), not prompt text")
        limits.check(entry.prompt_tokens, entry.max_tokens, where=entry.where)
    return [(entries[i % len(entries)].num_prompt_tokens(), entries[i % len(entries)].max_tokens)
            for i in range(num_requests)]
