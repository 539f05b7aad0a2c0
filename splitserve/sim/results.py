"""Simulated runs written as load test results, so ``splitserve loadtest report`` and
``slo-scale`` read them like measured ones.

A simulated request becomes a ``RequestRecord`` sent at its arrival, with a chunk of one token
per output token at the time the simulator produced it (TTFT, TPOT and ITL are then
``loadtest.metrics``' own definitions: TPOT = (last - first token) / (output tokens - 1)), and
``server`` holding where it ran; a request the elastic router refused becomes a
``refused`` record with the router's sentence, as the load tester records a
RESOURCE_EXHAUSTED. A sweep is a run per rate, each in ``OUT/rate-<r>/``
(``requests.jsonl``, ``summary.json``, plots) beside ``OUT/sweep.json``: the layout and schema of
``splitserve loadtest sweep``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from splitserve.loadtest.metrics import SLO, summarize
from splitserve.loadtest.records import Chunk, RequestRecord
from splitserve.sim.outcome import SimResult


def to_records(result: SimResult) -> list[RequestRecord]:
    """A load test record per simulated request, in index order."""
    records = []
    for job in sorted(result.jobs, key=lambda j: j.request.index):
        r = job.request
        if job.refusal is not None:  # as the load tester records a RESOURCE_EXHAUSTED
            records.append(RequestRecord(r.index, r.arrival_s, r.arrival_s, r.prompt_tokens, r.output_tokens,
                                         status="refused", error=job.refusal, retry_after_s=job.retry_after_s,
                                         finished_s=job.finish_s))
            continue
        server: dict[str, Any] = {"prefill_instance": job.prefill_instance, "decode_instance": job.decode_instance,
                                  "prefill_end_s": job.prefill_end_s}
        if job.transfer_s:
            server["kv_transfer_s"] = job.transfer_s
        records.append(RequestRecord(r.index, r.arrival_s, r.arrival_s, r.prompt_tokens, r.output_tokens,
                                     chunks=[Chunk(t, 1) for t in result.token_times(job)], finished_s=job.finish_s,
                                     server=server))
    return records


def summarize_result(result: SimResult, slo: SLO, rate: float, meta: dict[str, Any]) -> dict[str, Any]:
    """The run's summary (loadtest.metrics' schema), with each instance's KV peak in the meta."""
    instances = [{"role": s.role, "index": s.index, "tp": s.tp, "kv_capacity_tokens": s.kv_capacity_tokens,
                  "peak_kv_tokens": s.peak_kv_tokens, "decode_steps": s.num_decode_steps} for s in result.instances]
    moves = [{"t": t, "worker": worker, "to_role": role} for t, worker, role in result.role_moves]
    extra = {"instances": instances} | ({"role_moves": moves} if moves else {})
    return summarize(to_records(result), slo, target_rate=rate, meta=meta | extra)


def simulate_sweep(rates: Sequence[float], run_at: Callable[[float], SimResult], slo: SLO, meta: dict[str, Any],
                   out_dir: Path | None) -> dict[str, Any]:
    """``run_at(rate)`` for each rate, scored; with ``out_dir``, every run and the sweep written
    there as ``splitserve loadtest sweep`` writes them. Returns the sweep summary."""
    from splitserve.loadtest.metrics import sweep_summary
    from splitserve.loadtest.runner import rate_folder, save_run, save_sweep

    runs = []
    for rate in rates:
        result = run_at(rate)
        summary = summarize_result(result, slo, rate, meta)
        if out_dir is not None:
            save_run(out_dir / rate_folder(rate), to_records(result), summary)
        runs.append(summary)
    return save_sweep(out_dir, runs, meta) if out_dir is not None else sweep_summary(runs, meta=meta)
