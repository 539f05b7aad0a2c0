"""What a simulation returns: every request's times and each instance's statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.sim.instances import DecodeBatch, Job


@dataclass(frozen=True)
class InstanceStats:
    """What one instance did: its role, TP, KV capacity and the most KV an iteration touched."""

    role: str  # "prefill", "decode", "colocated", or elastic's "elastic-<role at the end>"
    index: int
    tp: int
    kv_capacity_tokens: int
    peak_kv_tokens: int
    num_decode_steps: int


@dataclass(frozen=True)
class SimResult:
    """Every request's ``Job`` (by index) and the decode step ends its token times come from."""

    jobs: list[Job]
    instances: list[InstanceStats]
    step_ends: dict[int, list[float]]  # decode (or colocated) instance -> its DecodeBatch.step_ends
    role_moves: list[tuple[float, str, str]] = field(default_factory=list)  # elastic: (time, worker, new role)

    def token_times(self, job: Job) -> list[float]:
        """When each of the request's output tokens came out: the prefill's, then one per step."""
        assert job.prefill_end_s is not None and job.finish_s is not None, "a finished request"
        num_steps = job.request.output_tokens - 1
        if num_steps == 0:
            return [job.prefill_end_s]
        assert job.decode_instance is not None, "a request that decoded"
        return [job.prefill_end_s, *self.step_ends[job.decode_instance][job.first_step : job.first_step + num_steps]]


def decode_stats(role: str, index: int, tp: int, decode: DecodeBatch) -> InstanceStats:
    return InstanceStats(role, index, tp, decode.capacity, decode.peak_kv_tokens, len(decode.step_ends))
