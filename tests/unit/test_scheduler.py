"""Scheduler: continuous batching, chunked prefill, limits, prefix hits and preemption.

A small driver plays the engine's part without a model: after each step it advances
``num_computed_tokens``, publishes full blocks, and appends a token (a fixed function of the
request's tokens so far) to every request whose step completes; requests finish after their
``max_tokens`` output tokens.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.kv_cache import KVCacheManager
from splitserve.engine.request import Request, RequestStatus
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler, SchedulerOutput


def next_token(token_ids: list[int]) -> int:
    """What the 'model' generates: the same after a recomputation, so outputs are checkable."""
    return 1000 + (sum(token_ids) * 31 + len(token_ids)) % 97


def expected_output(prompt: list[int], num_tokens: int) -> list[int]:
    token_ids = list(prompt)
    for _ in range(num_tokens):
        token_ids.append(next_token(token_ids))
    return token_ids[len(prompt) :]


class Driver:
    def __init__(
        self,
        num_blocks: int = 64,
        block_size: int = 4,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 64,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
    ):
        self.kv = KVCacheManager(BlockPool(num_blocks, block_size, enable_prefix_caching))
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        self.finished: list[Request] = []
        self.outputs: list[SchedulerOutput] = []

    def add(self, request_id: str, prompt: list[int], max_tokens: int, max_chunk_tokens: int | None = None) -> Request:
        request = Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens), max_tokens,
                          max_chunk_tokens=max_chunk_tokens)
        self.scheduler.add(request)
        return request

    def step(self) -> SchedulerOutput:
        before = {r.request_id: list(r.token_ids) for r in [*self.scheduler.waiting, *self.scheduler.running]}
        was_running = {r.request_id for r in self.scheduler.running}
        out = self.scheduler.schedule()
        self.check(out, before, was_running)
        for scheduled in out.scheduled:
            request = scheduled.request
            completes = scheduled.completes
            request.num_computed_tokens += scheduled.num_new_tokens
            self.kv.cache_full_blocks(request.request_id, request.token_ids, request.num_computed_tokens)
            if completes:
                request.token_ids.append(next_token(request.token_ids))
                if request.num_output_tokens >= request.max_tokens:
                    self.scheduler.finish(request)
                    self.finished.append(request)
        self.outputs.append(out)
        return out

    def run(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.num_unfinished:
                return
            self.step()
        raise AssertionError(f"not done after {max_steps} steps: {self.scheduler.num_unfinished} left (deadlock?)")

    def check(self, out: SchedulerOutput, before: dict[str, list[int]], was_running: set[str]) -> None:
        """Invariants of every step."""
        scheduler = self.scheduler
        assert out.num_batched_tokens <= scheduler.max_num_batched_tokens
        assert len(scheduler.running) <= scheduler.max_num_seqs
        ids = [s.request.request_id for s in out.scheduled]
        assert len(ids) == len(set(ids))
        for scheduled in out.scheduled:
            request = scheduled.request
            assert request in scheduler.running and request.status is RequestStatus.RUNNING
            assert 0 < scheduled.num_new_tokens <= request.num_tokens - request.num_computed_tokens
            if request.max_chunk_tokens is not None:
                assert scheduled.num_new_tokens - scheduled.num_spec_tokens <= request.max_chunk_tokens
        prefills = [s for s in out.scheduled if s.is_prefill]
        caps = [s.request.max_chunk_tokens for s in prefills if s.request.max_chunk_tokens is not None]
        if caps:  # a capped prefill caps the prompt tokens of its whole step
            assert sum(s.num_new_tokens for s in prefills) <= min(caps)
            table = self.kv.block_table(request.request_id)
            assert len(table) * self.kv.block_size >= request.num_computed_tokens + scheduled.num_new_tokens
        for request_id in out.preempted:
            (request,) = [r for r in scheduler.waiting if r.request_id == request_id]
            assert request_id not in ids
            assert request.num_computed_tokens == 0 and request.status is RequestStatus.WAITING
            assert not self.kv.has_request(request_id)
            assert request.token_ids == before[request_id], "a preempted request lost its output tokens"
        # Victims (the most recently started first) go back to the head of the queue, in start order.
        victims = [r.request_id for r in list(scheduler.waiting)[: len(out.preempted)]]
        assert victims == out.preempted[::-1]
        if out.preempted:  # blocks ran out: this step admits nobody new
            assert set(ids) <= was_running
        assert all(r.num_computed_tokens == 0 for r in scheduler.waiting)

    def assert_all_done(self, requests: list[Request]) -> None:
        assert self.scheduler.num_unfinished == 0
        assert sorted(r.request_id for r in self.finished) == sorted(r.request_id for r in requests)
        for request in requests:
            assert request.is_finished
            assert request.output_token_ids == expected_output(request.prompt_token_ids, request.max_tokens)
        assert self.kv.num_free_blocks == self.kv.pool.num_blocks, "blocks leaked"
        assert all(block.ref_count == 0 for block in self.kv.pool.blocks)


def prompt(n: int, start: int = 1) -> list[int]:
    return list(range(start, start + n))


def scheduled_ids(out: SchedulerOutput) -> list[str]:
    return [s.request.request_id for s in out.scheduled]


def test_continuous_batching_joins_and_leaves_between_steps():
    d = Driver()
    a = d.add("a", prompt(5), max_tokens=4)
    b = d.add("b", prompt(3, start=50), max_tokens=2)
    out = d.step()
    assert scheduled_ids(out) == ["a", "b"]
    assert [s.num_new_tokens for s in out.scheduled] == [5, 3]
    assert a.num_output_tokens == 1 and b.num_output_tokens == 1

    c = d.add("c", prompt(4, start=80), max_tokens=3)  # arrives mid-run
    out = d.step()
    assert scheduled_ids(out) == ["a", "b", "c"]
    assert [s.num_new_tokens for s in out.scheduled] == [1, 1, 4]  # decodes and a prefill together
    assert b.is_finished and b not in d.scheduler.running

    out = d.step()
    assert scheduled_ids(out) == ["a", "c"]
    d.run()
    assert d.outputs[-1].scheduled and all(s.request is not b for s in d.outputs[-1].scheduled)
    d.assert_all_done([a, b, c])


def test_idle_scheduler_schedules_nothing():
    d = Driver()
    out = d.step()
    assert out.scheduled == [] and out.preempted == []


def test_chunked_prefill_splits_a_long_prompt_under_the_budget():
    d = Driver(max_num_batched_tokens=16)
    long = d.add("long", prompt(50), max_tokens=2)
    chunks = []
    while not long.num_output_tokens:
        out = d.step()
        chunks.append(out.scheduled[0].num_new_tokens)
    assert chunks == [16, 16, 16, 2]
    d.run()
    d.assert_all_done([long])


def test_chunked_prefill_shares_the_budget_with_decodes():
    d = Driver(max_num_batched_tokens=16)
    decoding = d.add("decoding", prompt(3, start=90), max_tokens=20)
    d.step()
    long = d.add("long", prompt(50), max_tokens=2)
    while not long.num_output_tokens:
        out = d.step()
        assert scheduled_ids(out) == ["decoding", "long"], "decoding stalled during a prefill"
        assert out.num_batched_tokens <= 16
    assert [o.scheduled[1].num_new_tokens for o in d.outputs[1:]] == [15, 15, 15, 5]
    d.run()
    assert max(o.num_batched_tokens for o in d.outputs) == 16
    d.assert_all_done([decoding, long])


def test_a_requests_chunk_cap_splits_its_prefill_beside_decodes():
    d = Driver(max_num_batched_tokens=64)
    decoding = [d.add(f"d{i}", prompt(3, start=90 + 5 * i), max_tokens=12) for i in range(3)]
    d.step()
    capped = d.add("capped", prompt(50), max_tokens=2, max_chunk_tokens=16)
    chunks = []
    while not capped.num_output_tokens:
        out = d.step()
        assert scheduled_ids(out) == ["d0", "d1", "d2", "capped"], "the decodes ran beside every chunk"
        assert [s.is_prefill for s in out.scheduled] == [False, False, False, True]
        chunks.append(out.scheduled[-1].num_new_tokens)
    assert chunks == [16, 16, 16, 2], "capped both when admitted and when continued"
    d.run()
    d.assert_all_done([*decoding, capped])


def test_capped_prompts_queued_together_go_chunk_after_chunk_under_one_cap():
    d = Driver(max_num_batched_tokens=64)
    decoding = [d.add(f"d{i}", prompt(3, start=90 + 5 * i), max_tokens=20) for i in range(2)]
    d.step()
    a = d.add("a", prompt(40), max_tokens=2, max_chunk_tokens=16)
    b = d.add("b", prompt(40, start=200), max_tokens=2, max_chunk_tokens=16)
    chunks = []
    while not b.num_output_tokens:
        out = d.step()
        chunks.append([(s.request.request_id, s.num_new_tokens) for s in out.scheduled if s.is_prefill])
    # Every step carries one chunk's worth of prompt (16 tokens), a's first, then b's: what the
    # placement predicted, not a chunk per prompt per step.
    assert chunks == [[("a", 16)], [("a", 16)], [("a", 8), ("b", 8)], [("b", 16)], [("b", 16)]]
    uncapped = d.add("c", prompt(30, start=300), max_tokens=2)
    capped = d.add("e", prompt(30, start=400), max_tokens=2, max_chunk_tokens=8)
    out = d.step()  # an uncapped prompt ahead of a capped one runs as before; the capped one waits
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled if s.is_prefill] == [("c", 30)]
    d.run()
    d.assert_all_done([*decoding, a, b, uncapped, capped])


def test_the_step_budget_still_limits_a_capped_request():
    d = Driver(max_num_batched_tokens=16)
    decoding = d.add("decoding", prompt(3, start=90), max_tokens=20)
    d.step()
    capped = d.add("capped", prompt(50), max_tokens=2, max_chunk_tokens=32)
    while not capped.num_output_tokens:
        d.step()
    assert [o.scheduled[1].num_new_tokens for o in d.outputs[1:]] == [15, 15, 15, 5]
    d.run()
    d.assert_all_done([decoding, capped])


def test_a_chunk_cap_splits_a_prompt_even_without_chunked_prefill():
    d = Driver(max_num_batched_tokens=16, enable_chunked_prefill=False)
    capped = d.add("capped", prompt(20), max_tokens=2, max_chunk_tokens=8)
    d.run()
    assert [o.num_batched_tokens for o in d.outputs[:3]] == [8, 8, 4]
    d.assert_all_done([capped])


def test_without_chunked_prefill_prompts_are_scheduled_whole():
    d = Driver(max_num_batched_tokens=16, enable_chunked_prefill=False)
    decoding = d.add("decoding", prompt(3, start=90), max_tokens=4)
    d.step()
    whole = d.add("whole", prompt(16), max_tokens=2)  # fits the budget, but not beside a decode
    for _ in range(3):
        out = d.step()
        assert scheduled_ids(out) == ["decoding"]
        assert whole.num_computed_tokens == 0 and not d.kv.has_request("whole")
    out = d.step()  # the decode finished: the whole prompt goes in one piece
    assert scheduled_ids(out) == ["whole"] and out.scheduled[0].num_new_tokens == 16
    d.run()
    d.assert_all_done([decoding, whole])


def test_without_chunked_prefill_a_prompt_over_the_budget_is_never_split():
    d = Driver(max_num_batched_tokens=16, enable_chunked_prefill=False)
    too_long = d.add("too_long", prompt(20), max_tokens=2)
    for _ in range(5):
        out = d.step()
        assert out.scheduled == []
    assert too_long.num_computed_tokens == 0 and not d.kv.has_request("too_long")
    assert d.kv.num_free_blocks == d.kv.pool.num_blocks


def test_max_num_seqs_is_respected():
    d = Driver(max_num_seqs=2)
    requests = [d.add(f"r{i}", prompt(4, start=10 * i), max_tokens=3) for i in range(5)]
    out = d.step()
    assert scheduled_ids(out) == ["r0", "r1"]
    assert [r.request_id for r in d.scheduler.waiting] == ["r2", "r3", "r4"]
    d.run()
    assert max(len(o.scheduled) for o in d.outputs) == 2
    # Admission stays in arrival order.
    first_step = {}
    for i, o in enumerate(d.outputs):
        for request_id in scheduled_ids(o):
            first_step.setdefault(request_id, i)
    assert sorted(first_step, key=first_step.get) == ["r0", "r1", "r2", "r3", "r4"]
    d.assert_all_done(requests)


def test_token_budget_caps_decodes_too():
    d = Driver(max_num_batched_tokens=3)
    requests = [d.add(f"r{i}", [i + 1], max_tokens=4) for i in range(5)]
    d.run()
    assert all(o.num_batched_tokens <= 3 for o in d.outputs)
    d.assert_all_done(requests)


def test_prefix_hit_sets_num_computed_tokens_to_the_cached_length():
    d = Driver(block_size=4)
    a = d.add("a", prompt(10), max_tokens=8)
    d.step()  # a's two full prompt blocks are published
    b = d.add("b", prompt(8) + [77, 78, 79], max_tokens=2)
    out = d.step()
    (scheduled_b,) = [s for s in out.scheduled if s.request is b]
    assert scheduled_b.num_new_tokens == 3  # computed, before the step: 8 cached tokens
    assert b.num_computed_tokens == 11
    assert d.kv.block_table("b")[:2] == d.kv.block_table("a")[:2]
    d.run()
    # a is finished and its blocks are free, but still cached: a same-prompt request hits.
    c = d.add("c", prompt(10), max_tokens=1)
    out = d.step()
    assert out.scheduled[0].num_new_tokens == 2
    d.run()
    d.assert_all_done([a, b, c])


def test_prefix_hit_of_a_whole_prompt_still_computes_its_last_token():
    d = Driver(block_size=4)
    a = d.add("a", prompt(8), max_tokens=1)
    d.run()
    b = d.add("b", prompt(8), max_tokens=1)
    out = d.step()
    assert out.scheduled[0].num_new_tokens == 4  # one block hit, not two: it must sample
    assert b.output_token_ids == a.output_token_ids
    d.run()
    d.assert_all_done([a, b])


def test_no_prefix_hits_without_prefix_caching():
    d = Driver(block_size=4, enable_prefix_caching=False)
    a = d.add("a", prompt(10), max_tokens=1)
    d.run()
    b = d.add("b", prompt(10), max_tokens=1)
    out = d.step()
    assert out.scheduled[0].num_new_tokens == 10
    d.run()
    d.assert_all_done([a, b])


@pytest.mark.parametrize("enable_chunked_prefill", [True, False])
@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_preemption_when_blocks_run_out(enable_chunked_prefill: bool, enable_prefix_caching: bool):
    # 3 requests of up to 15 computed tokens (4 blocks each) share 6 blocks of 4.
    d = Driver(
        num_blocks=6,
        block_size=4,
        enable_chunked_prefill=enable_chunked_prefill,
        enable_prefix_caching=enable_prefix_caching,
    )
    requests = [d.add(f"r{i}", prompt(6, start=20 * i), max_tokens=10) for i in range(3)]
    first_preemption = None
    for _ in range(500):
        if not d.scheduler.num_unfinished:
            break
        out = d.step()  # Driver.check: victims are back at 0, waiting, blockless, outputs intact
        if out.preempted and first_preemption is None:
            first_preemption = out
    assert first_preemption is not None, "the pool was meant to be too small"
    # The most recently started request is the victim, and it waits at the head of the queue.
    assert first_preemption.preempted == ["r2"]
    assert sum(r.num_preemptions for r in requests) >= 1
    restarts = [
        s for o in d.outputs for s in o.scheduled if s.request.num_preemptions and s.request.num_output_tokens
    ]
    assert restarts, "a preempted request never ran again"
    d.assert_all_done(requests)


def test_preempted_request_recomputes_prompt_and_outputs():
    d = Driver(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = d.add("a", prompt(2), max_tokens=6)
    b = d.add("b", prompt(2, start=10), max_tokens=6)
    while not b.num_preemptions:
        d.step()
    kept = list(b.token_ids)
    assert b.num_output_tokens > 0 and d.scheduler.waiting[0] is b
    while not d.kv.has_request("b"):
        d.step()
    (resumed,) = [s for s in d.outputs[-1].scheduled if s.request is b]
    assert resumed.num_new_tokens == len(kept), "the restart must cover the prompt and every output token"
    assert b.token_ids[: len(kept)] == kept
    d.run()
    d.assert_all_done([a, b])


def test_preempted_request_waits_ahead_of_later_arrivals():
    d = Driver(num_blocks=4, block_size=2, max_num_seqs=2, enable_prefix_caching=False)
    requests = [d.add(f"r{i}", prompt(2, start=10 * i), max_tokens=6) for i in range(3)]
    while not requests[1].num_preemptions:
        d.step()
    assert [r.request_id for r in d.scheduler.waiting] == ["r1", "r2"]
    d.run()
    d.assert_all_done(requests)


def test_resumed_request_hits_its_own_cached_prompt_and_output_blocks():
    d = Driver(num_blocks=6, block_size=2)  # b is preempted with 3 full blocks; 2 survive a's growth
    a = d.add("a", prompt(3), max_tokens=6)
    b = d.add("b", prompt(3, start=10), max_tokens=6)
    while not b.num_preemptions:
        d.step()
    num_kept = b.num_tokens
    assert b.num_output_tokens >= 2, "set up so that b's cached blocks hold output tokens"
    while not d.kv.has_request("b"):
        d.step()
    (resumed,) = [s for s in d.outputs[-1].scheduled if s.request is b]
    num_cached = num_kept - resumed.num_new_tokens
    assert num_cached > b.num_prompt_tokens, "the prefix hit should reach into the output tokens"
    d.run()
    d.assert_all_done([a, b])


def test_a_request_that_cannot_grow_alone_is_preempted_not_stuck():
    d = Driver(num_blocks=2, block_size=2)
    a = d.add("a", prompt(2), max_tokens=2)  # needs 2 blocks at its last step
    b = d.add("b", prompt(1, start=9), max_tokens=3)  # needs 2 blocks at its last step
    d.run(50)
    d.assert_all_done([a, b])


REQUESTS = st.lists(
    st.tuples(
        st.lists(st.integers(0, 1), min_size=1, max_size=24),  # prompt; tiny alphabet: prefix hits
        st.integers(1, 10),  # max_tokens
        st.integers(0, 6),  # arrival step
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(
    requests=REQUESTS,
    block_size=st.integers(1, 8),
    spare_blocks=st.integers(0, 12),
    budget=st.integers(1, 64),
    max_num_seqs=st.integers(1, 6),
    enable_chunked_prefill=st.booleans(),
    enable_prefix_caching=st.booleans(),
    chunk_cap=st.none() | st.integers(1, 16),
)
def test_every_request_finishes_and_no_block_leaks(
    requests, block_size, spare_blocks, budget, max_num_seqs, enable_chunked_prefill, enable_prefix_caching, chunk_cap
):
    # What the engine guarantees: a request alone fits the pool (and the budget, unchunked).
    longest = max(len(p) + n for p, n, _ in requests)
    num_blocks = -(-longest // block_size) + spare_blocks
    if not enable_chunked_prefill:
        budget = max(budget, longest)
    d = Driver(num_blocks, block_size, max_num_seqs, budget, enable_chunked_prefill, enable_prefix_caching)
    added = []
    for step in range(2000):
        for i, (tokens, max_tokens, arrival) in enumerate(requests):
            if arrival == step:
                added.append(d.add(f"r{i}", tokens, max_tokens, chunk_cap if i % 2 else None))
        if len(added) == len(requests) and not d.scheduler.num_unfinished:
            break
        d.step()
    else:
        raise AssertionError("requests still unfinished after 2000 steps: deadlock or livelock")
    d.assert_all_done(added)
