"""Isolated timings on an in-process engine, and the SLOs the load benchmarks derive from them.

A load benchmark states its SLOs as multiples of what one request costs alone on this machine
(BENCHMARKS.md): TTFT SLO = k x the isolated prefill of the workload's median prompt, TPOT
SLO = m x a batch-1 decode step. Both timings run here, on an ``LLMEngine`` in the benchmark's
process (no gRPC, no router); bench.goodput and bench.disaggregated call ``slo_profile``.
"""

from __future__ import annotations

import statistics
import time

from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.loadtest.metrics import SLO

DECODE_TOKENS = 33  # a decode step = (t(33 tokens) - t(1 token)) / 32


def local_prefill(engine: LLMEngine, prompt: list[int]) -> float:
    """Seconds from add_request to the first token of a max_tokens=1 request (no gRPC, no handoff)."""
    return _generate(engine, prompt, 1)


def time_decode(engine: LLMEngine, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(t of max_tokens tokens, t of 1 token), back to back."""
    return _generate(engine, prompt, max_tokens), _generate(engine, prompt, 1)


def _generate(engine: LLMEngine, prompt: list[int], max_tokens: int) -> float:
    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def isolated_timings(engine: LLMEngine, prompt: list[int], repeats: int) -> tuple[float, float]:
    """(prefill s, batch-1 decode step s) of prompt: medians of repeats, after one warm-up prefill."""
    local_prefill(engine, prompt)
    prefill = statistics.median(local_prefill(engine, prompt) for _ in range(repeats))
    steps = (time_decode(engine, prompt, DECODE_TOKENS) for _ in range(repeats))
    step = statistics.median((full - first) / (DECODE_TOKENS - 1) for full, first in steps)
    return prefill, step


def slo_profile(engine: LLMEngine, median_prompt: list[int], *, repeats: int, ttft_scale: float,
                tpot_scale: float, given: SLO = SLO()) -> dict:
    """The isolated timings of the workload's median prompt and the SLOs (ms) derived from them:
    ttft_scale x the prefill, tpot_scale x the decode step; a bound in ``given`` wins over its
    profile. The engine should run on 1 thread, as each 1-thread worker does."""
    prefill, step = isolated_timings(engine, median_prompt, repeats)
    return {
        "median_prompt_tokens": len(median_prompt), "isolated_prefill_s": prefill, "batch1_decode_step_s": step,
        "ttft_ms": given.ttft_ms or 1000 * ttft_scale * prefill,
        "tpot_ms": given.tpot_ms or 1000 * tpot_scale * step,
        "ttft_source": "given" if given.ttft_ms else f"{ttft_scale:g} x isolated prefill of the median prompt "
                                                     "(1 thread)",
        "tpot_source": "given" if given.tpot_ms else f"{tpot_scale:g} x batch-1 decode step (1 thread)",
    }


def slo_of(profile: dict) -> SLO:
    """The SLO a profile states."""
    return SLO(profile["ttft_ms"], profile["tpot_ms"])
