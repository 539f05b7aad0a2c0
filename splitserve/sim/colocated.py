"""Colocated mode: each instance prefills and decodes its own requests, by the scheduler the
config names (``prefill-first`` or ``chunked``). Placement is policy.py's; the state,
instances.py's; this module forms each iteration and applies its end."""

from __future__ import annotations

from splitserve.config import SimConfig
from splitserve.sim.events import EventLoop
from splitserve.sim.instances import ColocatedInstance, Job
from splitserve.sim.outcome import SimResult, decode_stats
from splitserve.sim.policy import choose_colocated, worker_ids
from splitserve.sim.profile import LatencyProfile

_MS = 1e-3


class Colocated:
    """Instances that prefill and decode their own requests (see config.SimConfig's schedulers).

    An iteration's plan is ``(decodes, prompt work)``: whether it advances the decode batch, and
    which prompts it computes how many tokens of. ``prefill-first``: whole prompts from the head
    of the queue while their KV fits and they total at most the KV capacity (DistServe's vLLM
    rule), else a decode step. ``chunked``: a decode token for every running request, then the
    rest of ``max_batched_tokens`` in prompt chunks, admitted prompts first, in order."""

    def __init__(self, profile: LatencyProfile, config: SimConfig, loop: EventLoop):
        self.loop = loop
        self.is_chunked = config.colocated_scheduler == "chunked"
        self.budget = config.max_batched_tokens
        self.instances = [ColocatedInstance(profile.at_tp(config.tp), config.max_num_seqs)
                          for _ in range(config.num_instances)]
        self.worker_ids = worker_ids("c", config.num_instances)

    def check(self, jobs: list[Job]) -> None:
        capacity = self.instances[0].profile.kv_capacity_tokens
        for job in jobs:
            if job.kv_tokens > capacity:
                raise ValueError(f"request {job.request.index}: its {job.kv_tokens} tokens of KV (prompt + output "
                                 f"- 1) exceed an instance's capacity ({capacity} tokens)")

    def arrive(self, now: float, job: Job) -> None:
        index = choose_colocated(self.worker_ids, self.instances)
        instance = self.instances[index]
        job.prefill_instance = job.decode_instance = index
        instance.waiting.append(job)
        instance.queued_tokens += job.request.prompt_tokens
        instance.num_unfinished += 1
        if not instance.is_busy:
            instance.is_busy = True
            self.loop.at(now, self._start, instance)

    def _start(self, now: float, instance: ColocatedInstance) -> None:
        prompts = self._chunks(instance) if self.is_chunked else self._whole_prompts(instance)
        decodes = instance.decode.size > 0 and (self.is_chunked or not prompts)
        instance.step = (decodes, prompts) if decodes or prompts else None
        instance.is_busy = instance.step is not None
        if instance.step is None:
            return
        self.loop.at(now + self._iteration_ms(instance, decodes, prompts) * _MS, self._done, instance)

    def _whole_prompts(self, instance: ColocatedInstance) -> list[tuple[Job, int]]:
        prompts: list[tuple[Job, int]] = []
        total = 0
        while instance.waiting and total + instance.waiting[0].request.prompt_tokens <= instance.decode.capacity:
            job = instance.admit_next()
            if job is None:
                break
            prompts.append((job, job.request.prompt_tokens))
            total += job.request.prompt_tokens
        return prompts

    def _chunks(self, instance: ColocatedInstance) -> list[tuple[Job, int]]:
        budget = self.budget - instance.decode.size
        prompts = []
        for job in instance.prefilling:
            if budget <= 0:
                return prompts
            n = min(job.request.prompt_tokens - job.num_prefilled, budget)
            prompts.append((job, n))
            budget -= n
        while budget > 0 and (job := instance.admit_next()) is not None:
            n = min(job.request.prompt_tokens, budget)
            prompts.append((job, n))
            budget -= n
        return prompts

    def _iteration_ms(self, instance: ColocatedInstance, decodes: bool, prompts: list[tuple[Job, int]]) -> float:
        context = instance.decode.context_plus_one() if decodes else 0
        held = instance.decode.context_plus_one()  # the decoding requests' KV, whether they step or not
        instance.decode.observe_kv(held + sum(job.num_prefilled + n for job, n in prompts))
        if not decodes:  # a prefill batch (whole prompts, or chunks when nothing decodes)
            return instance.profile.mixed_ms(0, 0, [(n, job.num_prefilled) for job, n in prompts])
        if not prompts:
            return instance.profile.decode_ms(instance.decode.size, context)
        return instance.profile.mixed_ms(instance.decode.size, context, [(n, job.num_prefilled) for job, n in prompts])

    def _done(self, now: float, instance: ColocatedInstance) -> None:
        assert instance.step is not None, "an iteration was running"
        decodes, prompts = instance.step
        if decodes:
            instance.num_unfinished -= len(instance.decode.end_step(now))
        for job, n in prompts:
            job.num_prefilled += n
            if job.num_prefilled == job.request.prompt_tokens:
                instance.prefilling.remove(job)
                job.prefill_end_s = now
                if job.request.output_tokens == 1:
                    job.finish_s = now
                    instance.decode.release(job.kv_tokens)
                    instance.num_unfinished -= 1
                else:
                    instance.decode.join(job)
        self._start(now, instance)

    def result(self, jobs: list[Job]) -> SimResult:
        stats = [decode_stats("colocated", i, c.profile.tp, c.decode) for i, c in enumerate(self.instances)]
        return SimResult(jobs, stats, {i: c.decode.step_ends for i, c in enumerate(self.instances)})

