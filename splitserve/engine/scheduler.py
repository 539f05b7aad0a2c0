"""Scheduler: continuous batching with chunked prefill and preemption by recomputation.

Each step it spends a token budget: first on running requests (a decode token each, or the
next chunk of an unfinished prefill), then on waiting requests in arrival order, reusing
prefix-cache hits. A request's ``max_chunk_tokens`` caps the prompt tokens of every step it
prefills in, below the budget (a worker mixing prompts into its decode batch bounds how much
each step slows the decodes; queued capped prompts go chunk after chunk). When blocks
run out it preempts the most recently started request: its blocks are freed, its counter goes
back to zero and it waits at the head of the queue, so a request that is alone always fits and
the engine never deadlocks. It never touches tensors.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from splitserve.engine.kv_cache import KVCacheManager
from splitserve.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    """A request's share of a step: ``num_new_tokens`` rows, the last ``num_spec_tokens`` of
    them draft tokens to verify (KV space for all of them is already reserved)."""

    request: Request
    num_new_tokens: int
    num_spec_tokens: int = 0
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def completes(self) -> bool:
        """True if this step computes the request's last token, so it samples a new one."""
        num_real = self.num_new_tokens - self.num_spec_tokens
        return self.request.num_computed_tokens + num_real == self.request.num_tokens

    @property
    def is_prefill(self) -> bool:
        """True if the step computes prompt tokens (or a preempted request's recomputation)
        rather than one decode token; read it before the step advances the request."""
        num_real = self.num_new_tokens - self.num_spec_tokens
        return num_real > 1 or self.request.num_output_tokens == 0

    def set_drafts(self, token_ids: list[int]) -> None:
        """Record the proposer's drafts; fewer than reserved shrink the step's rows."""
        assert len(token_ids) <= self.num_spec_tokens, "more drafts than reserved"
        self.num_new_tokens -= self.num_spec_tokens - len(token_ids)
        self.num_spec_tokens = len(token_ids)
        self.spec_token_ids = list(token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ):
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # since start, for metrics
        self._prefill_cap: float = math.inf  # this step's: the smallest cap of a prefill in it
        self._prefill_tokens = 0  # this step's prompt tokens so far

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Run a request whose blocks are allocated and whose KV arrived from elsewhere."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._prefill_cap, self._prefill_tokens = math.inf, 0
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _chunk(self, request: Request, num_tokens: int, budget: int) -> int:
        """How many of a request's pending tokens fit this step (0: wait for a later step).

        A prefill's ``max_chunk_tokens`` caps the prompt tokens of the whole step, its own and
        those of other prefills scheduled beside it: the cap bounds how much the step slows the
        decodes in it, which several prompts chunked at once would multiply. Prefills are served
        in order (running first, then waiting in arrival order), so queued prompts go chunk
        after chunk, as the router's placement predicts. The cap applies even without chunked
        prefill, which only lets the budget split more."""
        if self._is_prefill(request, num_tokens):
            cap = min(self._prefill_cap, request.max_chunk_tokens or math.inf)
            num_tokens = min(num_tokens, max(cap - self._prefill_tokens, 0))
        if num_tokens <= budget:
            return num_tokens
        return budget if self.enable_chunked_prefill else 0

    @staticmethod
    def _is_prefill(request: Request, num_tokens: int) -> bool:
        return num_tokens > 1 or request.num_output_tokens == 0

    def _scheduled(self, out: SchedulerOutput, request: Request, num_new: int, num_spec: int = 0) -> None:
        """Add the request's share to the step; a prefill's tokens (and cap) count against the
        step's prefill cap."""
        out.scheduled.append(ScheduledRequest(request, num_new + num_spec, num_spec))
        if self._is_prefill(request, num_new):
            self._prefill_tokens += num_new
            if request.max_chunk_tokens is not None:
                self._prefill_cap = min(self._prefill_cap, request.max_chunk_tokens)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._chunk(request, request.num_tokens - request.num_computed_tokens, budget)
            if num_new == 0:
                i += 1
                continue
            num_spec = self._num_spec(request, num_new, budget)
            total = request.num_computed_tokens + num_new + num_spec
            while not self.kv_cache.can_append(request.request_id, total):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                self.kv_cache.append(request.request_id, total)
                self._scheduled(out, request, num_new, num_spec)
                budget -= num_new + num_spec
                i += 1
        return budget

    @staticmethod
    def _num_spec(request: Request, num_new: int, budget: int) -> int:
        """Draft slots for a decoding request: its k, capped by the budget and by the tokens it
        may still generate (a step keeps at most k + 1)."""
        if request.num_tokens - request.num_computed_tokens != 1 or num_new != 1:
            return 0  # still prefilling
        remaining = request.max_tokens - request.num_output_tokens - 1
        return max(min(request.num_speculative_tokens, remaining, budget - num_new), 0)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            prefix = self.kv_cache.find_prefix(request.token_ids)
            num_cached = len(prefix) * self.kv_cache.block_size
            num_new = self._chunk(request, request.num_tokens - num_cached, budget)
            if num_new == 0 or not self.kv_cache.can_allocate(num_cached + num_new, prefix):
                break
            self.kv_cache.allocate(request.request_id, num_cached + num_new, prefix)
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.waiting.popleft()
            self.running.append(request)
            self._scheduled(out, request, num_new)
            budget -= num_new

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request.request_id)
        request.status = RequestStatus.FINISHED
