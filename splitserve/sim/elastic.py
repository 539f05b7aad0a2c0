"""Elastic mode: every instance can prefill for a remote decode instance, decode requests handed
to it, and run a request end to end with its prompt chunked into its own decode batch. Each
arriving request is placed by the router's own decision code (elastic_router.py), which may
refuse it (CapacityError: counted refused, as the load tester counts RESOURCE_EXHAUSTED); the
pools' roles follow the load by ``roles.balanced_move`` every ``RoleConfig.interval_s``, a
moving instance keeping everything it holds (a role is the pool it is listed in, nothing more).

An instance runs the chunked scheduler's iterations (colocated.py's timing, ``mixed_ms``): every
running request decodes, and the rest of ``max_batched_tokens`` goes to prompt chunks, each
prompt at most its placement's chunk size a step, in order of admission. Its KV, in tokens:
a local request reserves its whole final KV (prompt + output - 1) when its prefill is admitted;
a remote prompt its prompt tokens there until its prefill ends; a request handed to it waits
FCFS, after the KV transfer, until its whole final KV fits (nothing is preempted).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from splitserve.cluster.store import WorkerLoad
from splitserve.config import SimConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import CapacityError
from splitserve.protocol import SLO
from splitserve.router.prefill_placement import LOCAL, Placement
from splitserve.sim.elastic_router import ElasticRouter
from splitserve.sim.events import EventLoop
from splitserve.sim.instances import DecodeBatch, Job
from splitserve.sim.outcome import SimResult, decode_stats
from splitserve.sim.profile import InstanceProfile, LatencyProfile

_MS = 1e-3


@dataclass(eq=False)
class _Prompt:
    """A prompt an instance prefills: for itself (local) or for a remote decode instance."""

    job: Job
    placement: Placement
    kv_tokens: int  # what it holds here while it is prefilled

    @property
    def chunk_tokens(self) -> int | None:
        return self.placement.chunk_tokens


@dataclass(eq=False)
class ElasticInstance:
    """One instance: its role (the pool it is listed in), prompts waiting for KV and being
    prefilled, requests handed to it waiting for KV, and its decode batch."""

    worker_id: str
    index: int
    role: str
    profile: InstanceProfile
    max_seqs: int | None = None  # requests admitted at once (the engine's max_num_seqs)
    decode: DecodeBatch = field(init=False)
    waiting: deque[_Prompt] = field(default_factory=deque)
    prefilling: list[_Prompt] = field(default_factory=list)
    incoming: deque[Job] = field(default_factory=deque)  # KV landed, waiting for room here
    queued_tokens: int = 0  # prompt tokens not prefilled yet, waiting or admitted
    num_unfinished: int = 0  # requests it holds in any phase (a hand-off's decode side from placement)
    step: list[tuple[_Prompt, int]] | None = None
    is_busy: bool = False

    def __post_init__(self) -> None:
        self.decode = DecodeBatch(self.profile.kv_capacity_tokens, self.max_seqs)

    def load(self) -> WorkerLoad:
        """What its worker would report (block size 1: KV in tokens)."""
        capacity = self.profile.kv_capacity_tokens
        return WorkerLoad(self.queued_tokens, self.num_unfinished, capacity - self.decode.reserved_kv, capacity,
                          updated_at=0.0)

    def admit(self) -> list[Job]:
        """Requests handed here, then waiting prompts, in order, while their KV fits; the
        requests handed here that joined the decode batch."""
        joined = []
        while self.incoming and self.decode.can_reserve(self.incoming[0].kv_tokens):
            job = self.incoming.popleft()
            self.decode.reserve(job.kv_tokens)
            self.decode.join(job)
            joined.append(job)
        while self.waiting and self.decode.can_reserve(self.waiting[0].kv_tokens):
            prompt = self.waiting.popleft()
            self.decode.reserve(prompt.kv_tokens)
            self.prefilling.append(prompt)
        return joined

    def chunks(self, budget: int) -> list[tuple[_Prompt, int]]:
        budget -= self.decode.size
        work = []
        for prompt in self.prefilling:
            if budget <= 0:
                break
            left = prompt.job.request.prompt_tokens - prompt.job.num_prefilled
            n = min(left, budget, prompt.chunk_tokens or left)
            work.append((prompt, n))
            budget -= n
        return work


class Observer(Protocol):
    """Told of each request's moments (the router-decision parity test follows the simulation)."""

    def arriving(self, now: float, job: Job, instances: list[ElasticInstance]) -> None: ...

    def first_token(self, now: float, job: Job, placement: Placement) -> None: ...

    def finished(self, now: float, job: Job, placement: Placement) -> None: ...


class Elastic:
    """Instances of either pool, placed on by the router's decision code (module docstring)."""

    def __init__(self, profile: LatencyProfile, config: SimConfig, loop: EventLoop, slo: SLO,
                 observer: Observer | None = None):
        self.profile, self.loop, self.observer = profile, loop, observer
        self.budget, self.roles = config.max_batched_tokens, config.roles
        num = config.num_prefill + config.num_decode
        width = len(str(num))
        self.instances = [ElasticInstance(f"w{i:0{width}d}", i, "prefill" if i < config.num_prefill else "decode",
                                          profile.at_tp(config.prefill_tp if i < config.num_prefill
                                                        else config.decode_tp), config.max_num_seqs)
                          for i in range(num)]
        self.by_id = {instance.worker_id: instance for instance in self.instances}
        self.router = ElasticRouter(self.instances, slo, config.placement, config.roles)
        self.placements: dict[int, Placement] = {}
        self.params: dict[int, SamplingParams] = {}
        self.streaming: dict[int, Job] = {}  # first token out, not finished: the router streams them
        self.joined: set[int] = set()  # of those, the ones in their decode batch
        self.moves: list[tuple[float, str, str]] = []  # (time, worker, new role)
        self.num_unfinished = 0

    def check(self, jobs: list[Job]) -> None:
        capacity = min(instance.profile.kv_capacity_tokens for instance in self.instances)
        for job in jobs:
            if job.kv_tokens > capacity:
                raise ValueError(f"request {job.request.index}: its {job.kv_tokens} tokens of KV (prompt + output "
                                 f"- 1) exceed an instance's capacity ({capacity} tokens)")
        self.num_unfinished = len(jobs)
        if self.roles.enabled and jobs:
            self.loop.at(jobs[0].request.arrival_s + self.roles.interval_s, self._balance)

    # ------------------------------------------------------------------------------ placement

    def arrive(self, now: float, job: Job) -> None:
        r = job.request
        if self.observer is not None:
            self.observer.arriving(now, job, self.instances)
        self._stream_counts()
        params = SamplingParams(max_tokens=r.output_tokens, ignore_eos=True)
        try:
            placement = self.router.place(str(r.index), r.prompt_tokens, params, now)
        except CapacityError as refusal:
            job.refusal, job.retry_after_s, job.finish_s = str(refusal), refusal.retry_after_s, now
            self.num_unfinished -= 1
            return
        self.placements[r.index], self.params[r.index] = placement, params
        prefill, decode = self.by_id[placement.prefill_worker], self.by_id[placement.decode_worker]
        job.prefill_instance, job.decode_instance = prefill.index, decode.index
        is_local = placement.kind == LOCAL
        prefill.waiting.append(_Prompt(job, placement, job.kv_tokens if is_local else r.prompt_tokens))
        prefill.queued_tokens += r.prompt_tokens
        prefill.num_unfinished += 1
        if not is_local:
            decode.num_unfinished += 1
        self._wake(now, prefill)

    def _stream_counts(self) -> None:
        """The tokens each streaming request has produced by now, as the router has seen them."""
        for index, job in self.streaming.items():
            decode = self.instances[job.decode_instance]
            tokens = 1 + (len(decode.decode.step_ends) - job.first_step if index in self.joined else 0)
            self.router.requests.streamed(decode.worker_id, str(index), tokens)

    # ------------------------------------------------------------------------------ iterations

    def _wake(self, now: float, instance: ElasticInstance) -> None:
        if not instance.is_busy:
            instance.is_busy = True
            self.loop.at(now, self._start, instance)

    def _start(self, now: float, instance: ElasticInstance) -> None:
        self.joined.update(job.request.index for job in instance.admit())
        prompts = instance.chunks(self.budget)
        decodes = instance.decode.size > 0
        instance.step = prompts if decodes or prompts else None
        instance.is_busy = instance.step is not None
        if instance.step is None:
            return
        context = instance.decode.context_plus_one()
        chunks = [(n, p.job.num_prefilled) for p, n in prompts]
        instance.decode.observe_kv(context + sum(p.job.num_prefilled + n for p, n in prompts))
        ms = instance.profile.mixed_ms(instance.decode.size, context, chunks) if prompts else \
            instance.profile.decode_ms(instance.decode.size, context)
        self.loop.at(now + ms * _MS, self._done, instance)

    def _done(self, now: float, instance: ElasticInstance) -> None:
        assert instance.step is not None, "an iteration was running"
        if instance.decode.size:
            for job in instance.decode.end_step(now):
                self._finish(now, job)
        for prompt, n in instance.step:
            job = prompt.job
            job.num_prefilled += n
            instance.queued_tokens -= n
            if job.num_prefilled == job.request.prompt_tokens:
                instance.prefilling.remove(prompt)
                self._prefilled(now, instance, prompt)
        self._start(now, instance)

    def _prefilled(self, now: float, instance: ElasticInstance, prompt: _Prompt) -> None:
        """A prompt's last chunk: its first token; then it decodes here, or its KV travels."""
        job, placement = prompt.job, prompt.placement
        job.prefill_end_s = now
        index = job.request.index
        self.router.first_token(str(index), placement, job.request.prompt_tokens, self.params[index], now)
        if self.observer is not None:
            self.observer.first_token(now, job, placement)
        self.streaming[index] = job
        if placement.kind != LOCAL:
            instance.decode.release(prompt.kv_tokens)
            instance.num_unfinished -= 1
        if job.request.output_tokens == 1:
            if placement.kind == LOCAL:
                instance.decode.release(job.kv_tokens)
            self._finish(now, job)
        elif placement.kind == LOCAL:
            self.joined.add(index)
            instance.decode.join(job)
        else:
            job.transfer_s = self.profile.transfer_s(job.request.prompt_tokens)
            self.loop.at(now + job.transfer_s, self._kv_landed, job)

    def _kv_landed(self, now: float, job: Job) -> None:
        assert job.decode_instance is not None, "placed before its transfer"
        decode = self.instances[job.decode_instance]
        decode.incoming.append(job)
        self._wake(now, decode)

    def _finish(self, now: float, job: Job) -> None:
        index = job.request.index
        job.finish_s = now
        self.streaming.pop(index, None)
        self.joined.discard(index)
        placement = self.placements[index]
        self.by_id[placement.decode_worker].num_unfinished -= 1
        self.router.finished(str(index), placement, job.request.prompt_tokens, job.request.output_tokens)
        if self.observer is not None:
            self.observer.finished(now, job, placement)
        self.num_unfinished -= 1

    # ------------------------------------------------------------------------------ roles

    def _balance(self, now: float, _: None) -> None:
        move = self.router.next_move(now)
        if move is not None:
            self.by_id[move.worker_id].role = move.to_role
            self.router.moved_at = now
            self.moves.append((now, move.worker_id, move.to_role))
        if self.num_unfinished > 0:
            self.loop.at(now + self.roles.interval_s, self._balance)

    def result(self, jobs: list[Job]) -> SimResult:
        stats = [decode_stats(f"elastic-{i.role}", i.index, i.profile.tp, i.decode) for i in self.instances]
        return SimResult(jobs, stats, {i.index: i.decode.step_ends for i in self.instances}, role_moves=self.moves)
