"""The planner: the layout of N GPUs with the highest goodput per GPU, searched with the simulator.

``plan(profile, config, requests_at, slo)`` tries every layout (``layouts``): for each mode
asked for, every split of at most ``num_gpus`` GPUs -- disaggregated: P prefill instances of TP
tp_p and D decode instances of TP tp_d with P tp_p + D tp_d <= N, P, D >= 1; colocated (once per
scheduler; "zero prefill instances"): N' instances of TP t with N' t <= N; elastic: N' >= 2
instances of TP t, starting half in each pool (P = N' // 2: roles follow the load from there,
so the starting split is not searched) -- with the TP degrees the profile has. A layout is a
``SimConfig``: a mode is nothing but a simulator configuration.

**Goodput** (DistServe's): the highest rate at which >= ``attainment`` of the requests meet both
SLOs, found by binary search over the rate. Every probe simulates ``num_requests`` requests with
the same lengths and the arrival gaps of one seed scaled to the rate (common random numbers, so
attainment falls smoothly with the rate). The search starts from a bracket [0, hi]: hi is the
layout's **work bound** (``bounds.Work``: the rate its instances could not sustain even with
every step's fixed cost amortized away; for elastic with admission, which refuses what would
miss, the bound / attainment: it serves at most the bound and may refuse 1 - attainment of the
requests) -- or, when that rate passes (or no bound
exists: a fitted mixed model, elastic), doubled until a rate fails. It halves the bracket until
its width is within ``rate_tolerance`` of its upper end and reports its lower end: a rate that
was simulated and passed. A layout failing ``min_rate`` has goodput 0. The search assumes
attainment does not rise with the rate (as DistServe's does).

**Pruning** (exact under that assumption; the top ``top`` layouts of every mode are those a
full search finds): layouts are searched in order of their bound per GPU, best first, and a
layout's search stops once its upper end per GPU -- a rate known to fail, or the work bound
(over the attainment for elastic with admission) --
cannot beat the ``top``-th best goodput per GPU of its mode found so far (a layout without a
bound has no upper end until a rate fails: its doubling is never pruned). In disaggregated mode
the prefill instances never see the decode instances (arrivals go to them, nothing pushes
back), so a rate at which P instances of TP tp_p miss the TTFT SLO for more than 1 - attainment
of the requests fails every layout with that prefill pool: the lowest such rate caps their
brackets. A layout whose requests would miss the SLOs more often than that even served alone
(``bounds.lone_attainment``) has goodput 0 without a run. A work bound is a steady-state rate;
a finite run can beat it only by the backlog one SLO's worth of time builds, which for thousands
of requests is far below the tolerance (a run that passes at its bound is refused: too short).
No ``--jobs``: the pruning is sequential, and this project's machines have 2 shared cores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

from splitserve.config import PlacementConfig, PlanConfig, SimConfig, SimMode
from splitserve.loadtest.metrics import SLO
from splitserve.protocol import SLO as RequestSLO
from splitserve.sim.bounds import Work, lone_attainment
from splitserve.sim.outcome import SimResult
from splitserve.sim.profile import LatencyProfile
from splitserve.sim.simulator import simulate
from splitserve.sim.trace import SimRequest

_MS = 1e3
_MAX_RATE = 1e6  # req/s: a layout still meeting the SLOs here has SLOs too loose to plan by


def kind(config: SimConfig) -> str:
    """The mode a layout ranks in: disaggregated, colocated prefill-first/chunked, elastic."""
    return f"colocated {config.colocated_scheduler}" if config.mode == "colocated" else config.mode


def layouts(profile: LatencyProfile, config: PlanConfig) -> list[SimConfig]:
    """Every layout of at most ``config.num_gpus`` GPUs in ``config.modes``; ValueError for a mode
    the simulator cannot run."""
    n, degrees = config.num_gpus, [t for t in profile.tp_degrees if t <= config.num_gpus]
    out: list[SimConfig] = []
    for mode in config.modes:
        if mode not in get_args(SimMode):
            raise ValueError(f"--modes {mode}: the simulator has no {mode} mode "
                             f"(it has {', '.join(get_args(SimMode))})")
        if mode == "elastic":
            out += [SimConfig(mode="elastic", num_prefill=k // 2, prefill_tp=t, num_decode=k - k // 2, decode_tp=t,
                              max_batched_tokens=config.max_batched_tokens,
                              placement=PlacementConfig(chunk_tokens=config.prefill_chunk_tokens,
                                                        admission=config.admission))
                    for t in degrees for k in range(2, n // t + 1)]
            continue
        if mode == "disaggregated":
            out += [SimConfig(num_prefill=p, prefill_tp=tp_p, num_decode=d, decode_tp=tp_d)
                    for tp_p in degrees for tp_d in degrees
                    for p in range(1, (n - tp_d) // tp_p + 1) for d in range(1, (n - p * tp_p) // tp_d + 1)]
            continue
        schedulers = config.colocated_schedulers if mode == "colocated" else (SimConfig.colocated_scheduler,)
        out += [SimConfig(mode=mode, num_instances=k, tp=t, colocated_scheduler=s,  # type: ignore[arg-type]
                          max_batched_tokens=config.max_batched_tokens)
                for s in schedulers for t in degrees for k in range(1, n // t + 1)]
    if not out:
        raise ValueError(f"no layout fits {n} GPUs with the profile's TP degrees ({profile.tp_degrees})")
    return out


def _ceiling(s: Search, attainment: float) -> float:
    """The highest rate a layout could pass: its work bound; for one that refuses what would miss
    (elastic admission), the bound over the attainment asked (it serves at most the bound, so it
    meets the SLOs for at most bound / rate of the requests)."""
    refuses = s.config.mode == "elastic" and s.config.placement.admission
    return s.bound / attainment if refuses else s.bound


def request_slo(slo: SLO) -> RequestSLO:
    """The SLO every simulated request carries (seconds), which elastic placement decides against."""
    return RequestSLO(*(None if ms is None else ms / 1000 for ms in (slo.ttft_ms, slo.tpot_ms)))


def attainment(result: SimResult, slo: SLO) -> tuple[float, float]:
    """(share meeting both SLOs, share meeting the TTFT SLO), by loadtest.metrics' definitions:
    TTFT = first token - arrival, TPOT = (last - first token) / (output tokens - 1). A request
    the elastic router refused meets neither."""
    ttft_ms = math.inf if slo.ttft_ms is None else slo.ttft_ms
    tpot_ms = math.inf if slo.tpot_ms is None else slo.tpot_ms
    both = first = 0
    for job in result.jobs:
        if job.refusal is not None:
            continue
        assert job.prefill_end_s is not None and job.finish_s is not None, "every request finished"
        steps = job.request.output_tokens - 1
        if (job.prefill_end_s - job.request.arrival_s) * 1e3 <= ttft_ms:
            first += 1
            both += (job.finish_s - job.prefill_end_s) / steps * 1e3 <= tpot_ms if steps else 1
    return both / len(result.jobs), first / len(result.jobs)


@dataclass
class Search:
    """One layout's search: its probes (rate, attainment, TTFT attainment), the goodput found
    (req/s; None when pruned) and the bracket's upper end (a failing rate or the work bound)."""

    config: SimConfig
    bound: float
    goodput: float | None = None
    upper: float = math.inf
    probes: list[tuple[float, float, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def num_gpus(self) -> int:
        return self.config.num_gpus

    @property
    def goodput_per_gpu(self) -> float | None:
        return None if self.goodput is None else self.goodput / self.num_gpus

    def to_dict(self) -> dict[str, Any]:
        return {"mode": kind(self.config), "layout": self.config.describe(), "num_gpus": self.num_gpus,
                "goodput": self.goodput, "goodput_per_gpu": self.goodput_per_gpu, "pruned": self.goodput is None,
                "work_bound": None if math.isinf(self.bound) else self.bound,
                "upper": None if math.isinf(self.upper) else self.upper, "seconds": round(self.seconds, 3),
                "probes": [{"rate": r, "attainment": a, "ttft_attainment": t} for r, a, t in self.probes]}


class Planner:
    """The search over layouts (the module docstring). ``requests_at(rate)``: the trace at a rate."""

    def __init__(self, profile: LatencyProfile, config: PlanConfig, requests_at: Callable[[float], list[SimRequest]],
                 slo: SLO, progress: Callable[[Search], None] | None = None):
        self.profile, self.config, self.requests_at, self.slo = profile, config, requests_at, slo
        self.progress = progress or (lambda search: None)
        self._best: dict[str, list[float]] = {}  # mode -> the best goodputs per GPU so far, descending
        self._ttft_fails: dict[tuple[int, int], float] = {}  # (P, tp_p) -> lowest rate failing on TTFT alone
        self._lone: dict[tuple[Any, ...], float | None] = {}  # lone_attainment by what it depends on
        self._lengths: list[tuple[int, int]] = []
        self.num_simulations = 0

    def run(self) -> list[Search]:
        """Every layout's search, best goodput per GPU first (pruned ones last)."""
        self._lengths = [(r.prompt_tokens, r.output_tokens) for r in self.requests_at(1.0)]
        work = Work.of(self.profile, self._lengths)
        searches = [Search(c, work.bound(self.profile, c)) for c in layouts(self.profile, self.config)]
        for search in sorted(searches, key=lambda s: -s.bound / s.num_gpus):
            start = time.perf_counter()
            self._search(search)
            search.seconds = time.perf_counter() - start
            self.progress(search)
        return sorted(searches, key=lambda s: (s.goodput is None, -(s.goodput_per_gpu or 0.0), s.num_gpus))

    def _search(self, s: Search) -> None:
        cfg = self.config
        if (lone := self._lone_attainment(s.config)) is not None and lone < cfg.attainment:
            s.goodput, s.upper = 0.0, 0.0  # misses the SLOs even with each request alone
            self._record(s)
            return
        lo, hi = 0.0, _ceiling(s, cfg.attainment)
        is_failing = False  # hi is a rate known to fail (not just the work bound)
        if s.config.mode == "disaggregated" and (key := _prefill_pool(s.config)) in self._ttft_fails:
            if self._ttft_fails[key] < hi:
                hi, is_failing = self._ttft_fails[key], True
        is_guess = math.isinf(hi)  # no bound: hi is where the doubling starts, not an upper end
        if is_guess:
            hi = float(s.num_gpus)  # 1 req/s per GPU: doubled below until it fails
        while True:
            s.upper = hi
            if not (is_guess and not is_failing) and hi / s.num_gpus <= self._threshold(kind(s.config)):
                return  # cannot make its mode's top: pruned
            if is_failing and (hi <= cfg.min_rate or hi - lo <= cfg.rate_tolerance * hi):
                s.goodput = lo if lo >= cfg.min_rate else 0.0
                self._record(s)
                return
            if not is_failing and hi > _MAX_RATE:
                raise ValueError(f"{s.config.describe()} meets the SLOs at {hi / 2:g} requests/s: set tighter "
                                 "--slo-ttft-ms/--slo-tpot-ms")
            rate = max((lo + hi) / 2, cfg.min_rate) if is_failing else hi
            if self._passes(s, rate):
                lo = rate
                if not is_failing and rate >= _ceiling(s, cfg.attainment):
                    raise ValueError(f"{s.config.describe()}: {cfg.num_requests} requests at {rate:g}/s, more than "
                                     f"it can serve within the SLOs ({_ceiling(s, cfg.attainment):g}/s), still meet "
                                     "them: too few requests for these SLOs (raise --num-requests)")
                if not is_failing:
                    hi *= 2
            else:
                hi, is_failing = rate, True

    def _lone_attainment(self, c: SimConfig) -> float | None:
        key = (c.mode, c.colocated_scheduler, c.prefill_tp, c.decode_tp, c.tp, c.max_batched_tokens)
        if key not in self._lone:
            self._lone[key] = lone_attainment(self.profile, c, self._lengths, self.slo)
        return self._lone[key]

    def _passes(self, s: Search, rate: float) -> bool:
        result = simulate(self.profile, s.config, self.requests_at(rate), request_slo(self.slo))
        self.num_simulations += 1
        both, first = attainment(result, self.slo)
        s.probes.append((rate, both, first))
        if s.config.mode == "disaggregated" and first < self.config.attainment:
            key = _prefill_pool(s.config)
            self._ttft_fails[key] = min(self._ttft_fails.get(key, math.inf), rate)
        return both >= self.config.attainment

    def _threshold(self, mode: str) -> float:
        best = self._best.get(mode, [])
        return best[self.config.top - 1] if len(best) >= self.config.top else -math.inf

    def _record(self, s: Search) -> None:
        assert s.goodput_per_gpu is not None, "a finished search"
        best = self._best.setdefault(kind(s.config), [])
        best.append(s.goodput_per_gpu)
        best.sort(reverse=True)


def _prefill_pool(config: SimConfig) -> tuple[int, int]:
    return config.num_prefill, config.prefill_tp
