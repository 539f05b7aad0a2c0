"""What a layout cannot beat, computed from the profile's formulas without simulating (the
planner's pruning; planner.py's docstring says how they are used).

- ``Work.bound``: the steady-state rate a layout's instances cannot sustain even with every
  step's fixed cost amortized away: a request's prefill costs at least b L + c L^2 ms (whole
  prompts; chunks at least b L + c L^2 / 2, since sum(n (start + n)) >= L^2 / 2), each decode
  token at least b (C + 1) + c with each coefficient the smaller of the two decode triples'.
  An elastic layout of one TP (without a fitted mixed model) is bounded as colocated chunked
  instances are: wherever a request's prompt runs -- whole on an instance decoding nothing,
  or in chunks beside decodes -- it costs at least its chunked prefill work, and its tokens
  their decode work, on some instance of that TP; the KV transfer only adds.
- ``lone_attainment``: the share of requests that would meet the SLOs served alone, each by the
  profile's formulas (the times a lone request takes in the simulator: tests/unit/
  test_sim_simulator.py). More load never makes a request faster there -- every step's cost
  grows with its batch, a queue only adds waiting -- so no rate attains more: below the target
  the layout's goodput is 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from splitserve.config import SimConfig
from splitserve.loadtest.metrics import SLO
from splitserve.sim.profile import InstanceProfile, LatencyProfile

_MS = 1e3


@dataclass(frozen=True)
class Work:
    """Mean GPU work of one request on one instance of each TP degree, in ms, fixed costs
    amortized away (lower bounds): ``prefill`` of whole prompts, ``chunked`` prefill, ``decode``."""

    prefill: dict[int, float]
    chunked: dict[int, float]
    decode: dict[int, float]

    @classmethod
    def of(cls, profile: LatencyProfile, lengths: Sequence[tuple[int, int]]) -> Work:
        prefill, chunked, decode = {}, {}, {}
        for p in profile.instances:
            prefill[p.tp] = _mean(lengths, lambda n, o, p=p: p.prefill.b * n + p.prefill.c * n * n)
            chunked[p.tp] = _mean(lengths, lambda n, o, p=p: p.prefill.b * n + p.prefill.c * n * n / 2)
            decode[p.tp] = _mean(lengths, lambda n, o, p=p: _decode_work(p, n, o))
        return cls(prefill, chunked, decode)

    def bound(self, profile: LatencyProfile, config: SimConfig) -> float:
        """The rate (req/s) the layout cannot sustain; inf where no bound is known."""
        if config.mode == "disaggregated":
            return min(config.num_prefill * _MS / self.prefill[config.prefill_tp],
                       config.num_decode * _MS / self.decode[config.decode_tp])
        if config.mode == "elastic":  # every instance runs chunked iterations, or whole prompts alone
            if config.prefill_tp != config.decode_tp or profile.at_tp(config.decode_tp).mixed is not None:
                return math.inf
            instances, tp = config.num_prefill + config.num_decode, config.decode_tp
            return instances * _MS / (self.chunked[tp] + self.decode[tp])
        if config.mode != "colocated" or profile.at_tp(config.tp).mixed is not None:
            return math.inf
        first = self.chunked if config.colocated_scheduler == "chunked" else self.prefill
        return config.num_instances * _MS / (first[config.tp] + self.decode[config.tp])

def _mean(lengths: Sequence[tuple[int, int]], work: Callable[[int, int], float]) -> float:
    return max(sum(work(n, o) for n, o in lengths) / len(lengths), 1e-12)


def _decode_work(p: InstanceProfile, prompt: int, output: int) -> float:
    """Its o - 1 decode tokens at C + 1 = prompt + 1 .. prompt + o - 1, each b (C + 1) + c at least."""
    small, large = p.decode.small, p.decode.large
    steps = output - 1
    return min(small.b, large.b) * (steps * (prompt + 1) + steps * (steps - 1) / 2) + min(small.c, large.c) * steps


def lone_attainment(profile: LatencyProfile, config: SimConfig, lengths: Sequence[tuple[int, int]],
                    slo: SLO) -> float | None:
    """The share of ``lengths`` meeting ``slo`` when each request is served alone on ``config``;
    None for a mode without formulas here (elastic)."""
    if config.mode not in ("disaggregated", "colocated"):
        return None
    ttft_ms = math.inf if slo.ttft_ms is None else slo.ttft_ms
    tpot_ms = math.inf if slo.tpot_ms is None else slo.tpot_ms
    first = profile.at_tp(config.prefill_tp if config.mode == "disaggregated" else config.tp)
    last = profile.at_tp(config.decode_tp if config.mode == "disaggregated" else config.tp)
    is_chunked = config.mode == "colocated" and config.colocated_scheduler == "chunked"
    met = 0
    for prompt, output in lengths:
        ttft = _chunked_ms(first, prompt, config.max_batched_tokens) if is_chunked else first.prefill_ms([prompt])
        steps = output - 1
        transfer_ms = profile.transfer_s(prompt) * _MS if config.mode == "disaggregated" else 0.0
        decode = _lone_decode_ms(last, prompt, steps)
        met += ttft <= ttft_ms and (not steps or (transfer_ms + decode) / steps <= tpot_ms)
    return met / len(lengths)


def _lone_decode_ms(p: InstanceProfile, prompt: int, steps: int) -> float:
    """``steps`` decode steps of one request, C + 1 = prompt + 1 .. prompt + steps."""
    t = p.decode.small if p.decode.threshold > 1 else p.decode.large
    return steps * (t.a + t.c) + t.b * (steps * (prompt + 1) + steps * (steps - 1) / 2)


def _chunked_ms(p: InstanceProfile, prompt: int, budget: int) -> float:
    return sum(p.mixed_ms(0, 0, [(min(budget, prompt - start), start)]) for start in range(0, prompt, budget))
