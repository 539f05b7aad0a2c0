"""The simulated instances' state: queues, batches and KV, advanced by simulator.py's events.

Nothing here knows time or events; the simulator asks an instance for its next batch or step,
schedules its end, and tells the instance when it ended.

KV accounting (one instance, in tokens): a request is *admitted* to a decode batch only when
its whole final KV -- prompt + output - 1 tokens, the context of its last decode step --
fits beside what the requests already admitted reserved; until then it waits at the head of
the instance's FCFS queue, and the requests behind it wait too. So no step ever needs more KV
than the instance holds, and nothing is preempted. (The real engine admits on the prompt's
blocks and preempts by recomputation when blocks run out; DistServe's simulator does not
bound decode KV at all.) ``peak_kv_tokens`` records the most KV any iteration touched.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

from splitserve.cluster.store import WorkerLoad
from splitserve.sim.profile import InstanceProfile
from splitserve.sim.trace import SimRequest


@dataclass(slots=True, eq=False)
class Job:
    """A request as the simulator moves it, and what happened to it (times in seconds)."""

    request: SimRequest
    prefill_instance: int | None = None
    decode_instance: int | None = None
    num_prefilled: int = 0  # prompt tokens computed so far (chunked prefill)
    prefill_end_s: float | None = None  # = its first token
    transfer_s: float = 0.0
    first_step: int = 0  # index of its first decode step in its decode instance's DecodeBatch.step_ends
    finish_s: float | None = None  # its last token, or (refused) its refusal
    refusal: str | None = None  # elastic: the router's CapacityError, when it refused the request
    retry_after_s: float | None = None  # that refusal's retry hint

    @property
    def kv_tokens(self) -> int:
        """Its KV at the end: every prompt token and every output token but the last."""
        return self.request.prompt_tokens + self.request.output_tokens - 1


@dataclass(eq=False)
class DecodeBatch:
    """Continuous batching without per-token work: a request that joins at decode step j has
    C + 1 = prompt + 1 - j + k at step k, so the batch's sum(C_i + 1) at step k is
    ``base + size * k`` and a request leaves at step j + output - 2 (the prefill gave its first
    token). ``step_ends``: when each decode step ended -- the token times of every request."""

    capacity: int
    max_seqs: int | None = None  # requests admitted at once (the engine's max_num_seqs); None: no bound
    num_reserved: int = 0  # requests admitted: a reservation each, until its release
    size: int = 0
    base: int = 0
    reserved_kv: int = 0
    peak_kv_tokens: int = 0
    step_ends: list[float] = field(default_factory=list)
    leaving: defaultdict[int, list[Job]] = field(default_factory=lambda: defaultdict(list))

    def can_reserve(self, num_tokens: int) -> bool:
        """Whether one more request holding ``num_tokens`` of KV can be admitted."""
        has_seat = self.max_seqs is None or self.num_reserved < self.max_seqs
        return has_seat and self.reserved_kv + num_tokens <= self.capacity

    def reserve(self, num_tokens: int) -> None:
        """Admit one request holding ``num_tokens`` of KV (each is released once: ``release``)."""
        assert self.can_reserve(num_tokens), f"KV over capacity: {self.reserved_kv} + {num_tokens} > " \
            f"{self.capacity}, or {self.num_reserved} requests of at most {self.max_seqs}"
        self.reserved_kv += num_tokens
        self.num_reserved += 1

    def release(self, num_tokens: int) -> None:
        self.reserved_kv -= num_tokens
        self.num_reserved -= 1
        assert self.reserved_kv >= 0 and self.num_reserved >= 0, "released more than was reserved"

    def join(self, job: Job) -> None:
        """Add a prefilled request whose KV is reserved; it decodes from the next step on."""
        j = len(self.step_ends)
        job.first_step = j
        self.size += 1
        self.base += job.request.prompt_tokens + 1 - j
        self.leaving[j + job.request.output_tokens - 2].append(job)

    def context_plus_one(self) -> int:
        """The next step's sum(C_i + 1): the KV it reads, its new tokens included."""
        return self.base + self.size * len(self.step_ends)

    def end_step(self, now: float) -> list[Job]:
        """Record the step that ends ``now``; the requests it finished, their KV released."""
        k = len(self.step_ends)
        self.step_ends.append(now)
        done = self.leaving.pop(k, [])
        for job in done:
            job.finish_s = now
            self.size -= 1
            self.base -= job.request.prompt_tokens + 1 - job.first_step
            self.release(job.kv_tokens)
        return done

    def observe_kv(self, num_tokens: int) -> None:
        """An iteration touches ``num_tokens`` of KV: checked against the capacity, peak kept."""
        assert num_tokens <= self.capacity, f"an iteration needs {num_tokens} KV tokens of {self.capacity}"
        self.peak_kv_tokens = max(self.peak_kv_tokens, num_tokens)


@dataclass(eq=False)
class PrefillInstance:
    """A prefill instance (disaggregated): FCFS queue, one batch at a time -- as many whole
    prompts from the head as fit in its KV capacity together (DistServe's rule), or, with a
    ``budget``, an engine step's worth: prompt chunks from the head, in order, at most
    ``budget`` tokens (a prompt's first token comes with its last chunk; a prompt cut short goes
    back to the head of the queue). ``batch``: (job, prompt tokens this batch computes)."""

    profile: InstanceProfile
    budget: int | None = None
    max_seqs: int | None = None  # prompts in one batch at most (the engine's max_num_seqs)
    waiting: deque[Job] = field(default_factory=deque)
    batch: list[tuple[Job, int]] = field(default_factory=list)
    # the prompt tokens of its requests before their first token (whole prompts, chunks done or
    # not: the router counts them so, and ranks with the larger of that and the worker's report)
    queued_tokens: int = 0
    peak_kv_tokens: int = 0
    is_busy: bool = False  # a batch runs, or is about to start

    def take_batch(self) -> list[tuple[Job, int]]:
        capacity, taken, kv = self.profile.kv_capacity_tokens, 0, 0
        while self.waiting and (self.max_seqs is None or len(self.batch) < self.max_seqs):
            job = self.waiting[0]
            left = job.request.prompt_tokens - job.num_prefilled
            if self.budget is None:
                n = left if kv + left <= capacity else 0
            else:
                n = min(left, self.budget - taken, capacity - kv - job.num_prefilled)
            if n <= 0:
                break
            self.waiting.popleft()
            self.batch.append((job, n))
            taken += n
            kv += job.num_prefilled + n
        self.peak_kv_tokens = max(self.peak_kv_tokens, kv)
        return self.batch

    def batch_ms(self) -> float:
        """The prefill formula over the batch's chunks (a whole prompt: its L^2 attention term)."""
        return self.profile.prefill_batch_ms(sum(n for _, n in self.batch),
                                             sum(n * (job.num_prefilled + n) for job, n in self.batch))

    def finish_batch(self) -> list[Job]:
        """The batch ended: the requests whose prompts it finished."""
        batch, self.batch, done = self.batch, [], []
        for job, n in reversed(batch):  # only the last can be cut short: it goes back first
            job.num_prefilled += n
            if job.num_prefilled < job.request.prompt_tokens:
                self.waiting.appendleft(job)
            else:
                self.queued_tokens -= job.request.prompt_tokens
                done.append(job)
        return done[::-1]


@dataclass(eq=False)
class DecodeInstance:
    """A decode instance (disaggregated): prefilled requests queue FCFS for KV (``incoming``:
    placed here, KV still in transfer), then decode together, one token a step."""

    profile: InstanceProfile
    max_seqs: int | None = None  # requests admitted at once (the engine's max_num_seqs)
    decode: DecodeBatch = field(init=False)
    waiting: deque[Job] = field(default_factory=deque)
    num_incoming: int = 0
    committed_kv: int = 0  # reserved by running requests, and needed by waiting and incoming ones
    is_busy: bool = False  # a step runs, or is about to start

    def __post_init__(self) -> None:
        self.decode = DecodeBatch(self.profile.kv_capacity_tokens, self.max_seqs)

    def admit(self) -> None:
        """Move waiting requests into the batch, in order, while their KV fits."""
        while self.waiting and self.decode.can_reserve(self.waiting[0].kv_tokens):
            job = self.waiting.popleft()
            self.decode.reserve(job.kv_tokens)
            self.decode.join(job)

    def step_ms(self) -> float:
        context = self.decode.context_plus_one()
        self.decode.observe_kv(context)
        return self.profile.decode_ms(self.decode.size, context)

    @property
    def num_requests(self) -> int:
        """Running, waiting for KV, or on their way here."""
        return self.decode.size + len(self.waiting) + self.num_incoming


@dataclass(eq=False)
class ColocatedInstance:
    """An instance that prefills and decodes its own requests. ``prefilling``: admitted (KV
    reserved), prompt not done; with the chunked scheduler a request may stay there for several
    iterations. ``step`` is the iteration now running: the decodes it advances and its prompt
    work as (job, tokens) pairs. ``load()`` is what its worker would report to the router."""

    profile: InstanceProfile
    max_seqs: int | None = None  # requests admitted at once (the engine's max_num_seqs)
    decode: DecodeBatch = field(init=False)
    waiting: deque[Job] = field(default_factory=deque)
    prefilling: list[Job] = field(default_factory=list)
    queued_tokens: int = 0  # prompt tokens of the waiting requests (not admitted yet), as its worker reports them
    num_unfinished: int = 0
    step: tuple[bool, list[tuple[Job, int]]] | None = None
    is_busy: bool = False  # an iteration runs, or is about to start
    _load: WorkerLoad | None = field(default=None, init=False, repr=False)
    _load_state: tuple[int, int, int] = field(default=(0, 0, 0), init=False, repr=False)

    def __post_init__(self) -> None:
        self.decode = DecodeBatch(self.profile.kv_capacity_tokens, self.max_seqs)

    def admit_next(self) -> Job | None:
        """The head of the queue, admitted (its KV reserved), if its KV fits; else None."""
        if not self.waiting or not self.decode.can_reserve(self.waiting[0].kv_tokens):
            return None
        job = self.waiting.popleft()
        self.queued_tokens -= job.request.prompt_tokens
        self.decode.reserve(job.kv_tokens)
        self.prefilling.append(job)
        return job

    def load(self) -> WorkerLoad:
        """As its worker reports it (worker/engine_loop.py: the engine's waiting prompts' tokens,
        its unfinished requests, free KV; block size 1); built anew only when one changed."""
        state = (self.queued_tokens, self.num_unfinished, self.decode.reserved_kv)
        if self._load is None or state != self._load_state:
            capacity = self.profile.kv_capacity_tokens
            self._load = WorkerLoad(state[0], state[1], capacity - state[2], capacity, updated_at=0.0)
            self._load_state = state
        return self._load
