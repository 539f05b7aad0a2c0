"""Disaggregated mode: prefill instances run batches of whole prompts (or, with
``SimConfig.prefill_batching == "chunked"``, the engine's steps of prompt chunks); each prefilled request
(its first token out) goes to a decode instance, after the KV transfer time of the profile (0
without a bandwidth), waits there for KV and decodes. Placement is policy.py's; the state,
instances.py's; this module only moves requests between them on the event loop's clock.

The decode instance is chosen when the prefill ends (DistServe's order) or, with
``SimConfig.decode_choice == "arrival"``, at the request's arrival together with the prefill
instance, as splitserve's router does (its Handoff reserves on the decode worker before the
prefill): the request then counts there, and its final KV is committed there, from its
arrival; a request of one output token leaves it at its first token."""

from __future__ import annotations

from splitserve.config import SimConfig
from splitserve.sim.events import EventLoop
from splitserve.sim.instances import DecodeInstance, Job, PrefillInstance
from splitserve.sim.outcome import InstanceStats, SimResult, decode_stats
from splitserve.sim.policy import RouterRankings
from splitserve.sim.profile import LatencyProfile

_MS = 1e-3


class Disaggregated:
    """Prefill instances and decode instances (see the module docstring)."""

    def __init__(self, profile: LatencyProfile, config: SimConfig, loop: EventLoop):
        self.profile, self.loop = profile, loop
        budget = config.max_batched_tokens if config.prefill_batching == "chunked" else None
        seqs = config.max_num_seqs
        self.prefill = [PrefillInstance(profile.at_tp(config.prefill_tp), budget, seqs)
                        for _ in range(config.num_prefill)]
        self.decode = [DecodeInstance(profile.at_tp(config.decode_tp), seqs) for _ in range(config.num_decode)]
        self.placement = RouterRankings(self.prefill, self.decode)
        self.is_decode_at_arrival = config.decode_choice == "arrival"

    def check(self, jobs: list[Job]) -> None:
        prefill_kv = self.prefill[0].profile.kv_capacity_tokens
        decode_kv = self.decode[0].profile.kv_capacity_tokens
        for job in jobs:
            r = job.request
            if r.prompt_tokens > prefill_kv:
                raise ValueError(f"request {r.index}: its {r.prompt_tokens}-token prompt exceeds a prefill "
                                 f"instance's KV capacity ({prefill_kv} tokens)")
            if r.output_tokens > 1 and job.kv_tokens > decode_kv:
                raise ValueError(f"request {r.index}: its {job.kv_tokens} tokens of KV (prompt + output - 1) "
                                 f"exceed a decode instance's capacity ({decode_kv} tokens)")

    def arrive(self, now: float, job: Job) -> None:
        index = self.placement.choose_prefill(self.prefill, job.request.prompt_tokens)
        instance = self.prefill[index]
        job.prefill_instance = index
        if self.is_decode_at_arrival:
            self._choose_decode(job)
        instance.waiting.append(job)
        instance.queued_tokens += job.request.prompt_tokens
        if not instance.is_busy:
            instance.is_busy = True
            self.loop.at(now, self._start_prefill, instance)

    def _start_prefill(self, now: float, instance: PrefillInstance) -> None:
        instance.is_busy = bool(instance.take_batch())
        if instance.is_busy:
            self.loop.at(now + instance.batch_ms() * _MS, self._prefill_done, instance)

    def _prefill_done(self, now: float, instance: PrefillInstance) -> None:
        for job in instance.finish_batch():
            job.prefill_end_s = now
            if job.request.output_tokens == 1:
                job.finish_s = now
                if job.decode_instance is not None:  # chosen at arrival: released unused
                    self.decode[job.decode_instance].num_incoming -= 1
                    self.decode[job.decode_instance].committed_kv -= job.kv_tokens
                continue
            if job.decode_instance is None:
                self._choose_decode(job)
            job.transfer_s = self.profile.transfer_s(job.request.prompt_tokens)
            if job.transfer_s > 0:
                self.loop.at(now + job.transfer_s, self._kv_landed, job)
            else:
                self._kv_landed(now, job)
        self._start_prefill(now, instance)

    def _choose_decode(self, job: Job) -> None:
        """The request's decode instance, where it counts as incoming and commits its final KV."""
        index = self.placement.choose_decode(self.decode, job.request.prompt_tokens)
        job.decode_instance = index
        self.decode[index].num_incoming += 1
        self.decode[index].committed_kv += job.kv_tokens

    def _kv_landed(self, now: float, job: Job) -> None:
        assert job.decode_instance is not None, "placed before its transfer"
        decode = self.decode[job.decode_instance]
        decode.num_incoming -= 1
        decode.waiting.append(job)
        if not decode.is_busy:
            decode.is_busy = True
            self.loop.at(now, self._start_decode, decode)

    def _start_decode(self, now: float, decode: DecodeInstance) -> None:
        decode.admit()
        decode.is_busy = decode.decode.size > 0
        if decode.is_busy:
            self.loop.at(now + decode.step_ms() * _MS, self._decode_done, decode)

    def _decode_done(self, now: float, decode: DecodeInstance) -> None:
        for job in decode.decode.end_step(now):
            decode.committed_kv -= job.kv_tokens
        self._start_decode(now, decode)

    def result(self, jobs: list[Job]) -> SimResult:
        stats = [InstanceStats("prefill", i, p.profile.tp, p.profile.kv_capacity_tokens, p.peak_kv_tokens, 0)
                 for i, p in enumerate(self.prefill)]
        stats += [decode_stats("decode", i, d.profile.tp, d.decode) for i, d in enumerate(self.decode)]
        return SimResult(jobs, stats, {i: d.decode.step_ends for i, d in enumerate(self.decode)})

