"""The requests a simulation serves: token counts and arrival times, from the load tester's
own workload specs and arrival processes, so a simulated run and a real ``splitserve loadtest``
run with the same workload, arrival, rate and seed see the same lengths at the same offsets.

Only lengths matter here, so no prompt text is written (``workloads.sample_lengths``); a
``file:`` workload must give ``prompt_tokens`` counts, since text has no token count without
the target's tokenizer. Only open-loop arrivals have a schedule to simulate; a ``trace``
replays a file's ``arrival_s``, scaled in time to each rate (``Arrival.offsets``), as the load
tester does.

``max_context_tokens`` models a model's context window (OPT's 2048): a request's prompt plus
output must fit in it. Sampled lengths (chat, code) are cut to fit -- the output first to N - 1,
then the prompt to N - output, as a client that keeps the latest turns of a conversation and
its requested output would -- while lengths a user wrote (fixed, prefix, file) that do not fit
are a ValueError. The load tester has no such cap (its ``--max-prompt-tokens`` and
``--max-output-tokens`` cap each length alone), so a run with it has no exact real twin.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.loadtest.arrivals import Arrival
from splitserve.loadtest.workloads import (
    AZURE_LENGTHS,
    LengthLimits,
    WorkloadSpec,
    read_workload_file,
    resolve_trace,
    sample_lengths,
)


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
                  scale: float = 1.0, limits: LengthLimits = LengthLimits(),
                  max_context_tokens: int | None = None) -> list[SimRequest]:
    """``num_requests`` requests of ``spec`` arriving by ``arrival`` at ``rate`` per second,
    seeded as the load tester seeds them (one seed for lengths and arrival times), each within
    ``max_context_tokens`` of prompt + output when given (the module docstring)."""
    if not arrival.is_open_loop:
        raise ValueError(f"the simulator needs an open-loop arrival (poisson, gamma:CV, constant, trace), "
                         f"got {arrival}")
    arrival, num_requests = resolve_trace(arrival, spec, num_requests)  # a trace: its file's first lines
    lengths = request_lengths(spec, num_requests, seed=seed, scale=scale, limits=limits,
                              max_context_tokens=max_context_tokens)
    offsets = arrival.offsets(rate, num_requests, seed)
    return [SimRequest(i, t, p, o) for i, (t, (p, o)) in enumerate(zip(offsets, lengths, strict=True))]


def request_lengths(spec: WorkloadSpec, num_requests: int, *, seed: int = 0, scale: float = 1.0,
                    limits: LengthLimits = LengthLimits(), max_context_tokens: int | None = None
                    ) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) of each request, as ``make_requests`` gives them."""
    lengths = _lengths(spec, num_requests, seed, scale, limits)
    if max_context_tokens is None:
        return lengths
    if max_context_tokens < 2:
        raise ValueError(f"max_context_tokens must be >= 2 (a prompt token and an output token), "
                         f"got {max_context_tokens}")
    if spec.kind in AZURE_LENGTHS:  # sampled
        return [_fit_context(p, o, max_context_tokens) for p, o in lengths]
    for i, (p, o) in enumerate(lengths):
        if p + o > max_context_tokens:
            raise ValueError(f"workload {spec}: request {i}'s {p} prompt + {o} output tokens exceed "
                             f"max_context_tokens {max_context_tokens}")
    return lengths


def _fit_context(prompt: int, output: int, max_context: int) -> tuple[int, int]:
    output = min(output, max_context - 1)
    return min(prompt, max_context - output), output


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
