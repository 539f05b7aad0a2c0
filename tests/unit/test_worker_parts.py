"""The worker runtime's parts without Ray or the model: membership beats against an in-memory
store (registration, renewal, re-registration after a lapse, what each beat publishes), the
prefix mirror's net changes, which steps feed which latency model, the startup profile's plan
and the steps it measures, how a request's tokens are grouped into messages, where a worker
says its KV receiver is, and the leases its streams are held under."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.cluster.embedded_store import MemoryStore
from splitserve.cluster.store import StoreConnectionError, WorkerInfo, WorkerLoad
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.engine import StepStats
from splitserve.engine.output import FinishReason, RequestOutput, SpecStats
from splitserve.latency import DecodeStepModel, MixedStepModel, PrefillModel
from splitserve.protocol import GenerateDelta, SpeculationLimits, StreamLease
from splitserve.worker.membership import Heartbeat, Membership
from splitserve.worker.prefix_mirror import PrefixMirror
from splitserve.worker.step_models import StepModels
from splitserve.worker.stream_leases import StreamLeases
from splitserve.worker.streams import stream_deltas


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def step(requests: int, batched: int, drafts: int = 0, seconds: float = 0.02, prefill: int = 0) -> StepStats:
    return StepStats(step_time=seconds, draft_time=0.0, num_requests=requests, num_batched_tokens=batched,
                     num_context_tokens=10 * requests, num_draft_tokens=drafts, num_accepted_tokens=0,
                     num_prefill_tokens=prefill, prefill_attention=prefill * prefill)


def membership(store: MemoryStore, models: StepModels, prefixes: PrefixMirror | None = None) -> Membership:
    info = WorkerInfo("w0", "decode", "w0", "kv://w0", "node")
    return Membership(store, info, 3.0, lambda: WorkerLoad(5, 2, 90, 100), models, SpeculationLimits(8, 3), prefixes)


def test_a_beat_registers_and_publishes_load_models_and_speculation():
    store = MemoryStore()
    models = StepModels(fits_prefill=False, fits_decode=True)
    models.record(step(4, 4))
    membership(store, models).beat()
    assert [w.worker_id for w in store.list_workers()] == ["w0"]
    assert store.get_loads()["w0"].num_queued_prompt_tokens == 5
    assert set(store.get_models(DecodeStepModel.NAME)) == {"w0"} and store.get_models(PrefillModel.NAME) == {}
    assert store.get_models(MixedStepModel.NAME) == {}
    assert SpeculationLimits.from_record(store.get_models(SpeculationLimits.NAME)["w0"]) == SpeculationLimits(8, 3)


def test_a_lapsed_membership_registers_again_with_everything():
    clock = Clock()
    store = MemoryStore(clock)
    pool = BlockPool(8, 4, enable_prefix_caching=True)
    prefixes = PrefixMirror(pool)
    member = membership(store, StepModels(fits_prefill=True, fits_decode=False), prefixes)
    pool.on_cache_change(b"h1", True)
    member.beat()
    assert store.match_prefix([b"h1"]) == {"w0": 1}
    clock.t += 10  # missed beats: the store dropped the worker and what it held
    assert store.list_workers() == []
    member.beat()
    assert [w.worker_id for w in store.list_workers()] == ["w0"]
    assert store.match_prefix([b"h1"]) == {"w0": 1}, "the prefix blocks were published again"
    assert "w0" in store.get_loads()


def test_a_failed_beat_makes_the_next_one_register_afresh():
    class FlakyStore(MemoryStore):
        fail = True

        def put_load(self, worker_id: str, load: WorkerLoad) -> None:
            if self.fail:
                raise ConnectionError("store hiccup")
            super().put_load(worker_id, load)

    store = FlakyStore()
    member = membership(store, StepModels(fits_prefill=False, fits_decode=True))
    with pytest.raises(ConnectionError):
        member.beat()
    store.fail = False
    registered = []
    store.register_worker = lambda info, ttl: (registered.append(info.worker_id),  # type: ignore[method-assign]
                                               MemoryStore.register_worker(store, info, ttl))
    member.beat()
    assert registered == ["w0"] and "w0" in store.get_loads()


class SlowToAnswer(MemoryStore):
    """A store whose first ``slow`` registrations time out, or that refuses every one."""

    def __init__(self, slow: int, refuses: bool = False):
        super().__init__()
        self.slow, self.refuses, self.tries = slow, refuses, 0

    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        self.tries += 1
        if self.refuses:
            raise PermissionError("the store refused the worker")
        if self.tries <= self.slow:
            raise StoreConnectionError("the store did not answer within 1.0 s")
        super().register_worker(info, ttl_s)


def test_a_starting_worker_waits_for_a_slow_store_up_to_its_deadline():
    clock, slept = Clock(), []
    models = StepModels(fits_prefill=False, fits_decode=True)

    def sleep(s: float) -> None:
        slept.append(s)
        clock.t += s

    store = SlowToAnswer(slow=3)
    membership(store, models).join(timeout_s=10.0, retry_s=0.5, sleep=sleep, clock=clock)
    assert store.tries == 4 and slept == [0.5] * 3 and [w.worker_id for w in store.list_workers()] == ["w0"]

    never = SlowToAnswer(slow=10**6)
    with pytest.raises(StoreConnectionError):
        membership(never, models).join(timeout_s=2.0, retry_s=0.5, sleep=sleep, clock=clock)
    assert never.tries == 5  # at 0, 0.5, 1, 1.5, 2 s

    refusing = SlowToAnswer(slow=0, refuses=True)
    with pytest.raises(PermissionError):  # not a timeout: no retry
        membership(refusing, models).join(timeout_s=10.0, retry_s=0.5, sleep=sleep, clock=clock)
    assert refusing.tries == 1


def test_prefix_mirror_sends_net_changes_and_everything_when_fresh():
    store = MemoryStore()
    store.register_worker(WorkerInfo("w0", "prefill", "w0", "", "node"), 30)
    pool = BlockPool(8, 4, enable_prefix_caching=True)
    mirror = PrefixMirror(pool)
    for h, cached in ((b"a", True), (b"b", True), (b"b", False), (b"c", True)):
        pool.on_cache_change(h, cached)
    mirror.publish(store, "w0", is_fresh=False)
    assert store.match_prefix([b"a"]) == {"w0": 1} and store.match_prefix([b"b"]) == {}
    pool.on_cache_change(b"a", False)
    mirror.publish(store, "w0", is_fresh=False)
    assert store.match_prefix([b"a"]) == {} and store.match_prefix([b"c"]) == {"w0": 1}
    store.register_worker(WorkerInfo("w0", "prefill", "w0", "", "node"), 30)  # wipes its entries
    mirror.publish(store, "w0", is_fresh=True)
    assert store.match_prefix([b"c"]) == {"w0": 1}
    pool.on_cache_change(b"d", True)
    mirror.discard_pending()
    mirror.publish(store, "w0", is_fresh=False)
    assert store.match_prefix([b"d"]) == {}


def test_step_models_feed_prefill_steps_and_pure_decode_steps_to_their_models():
    both = StepModels(fits_prefill=True, fits_decode=True)
    for stats in (step(2, 300, prefill=300), step(4, 4), step(4, 12, drafts=8), step(3, 64 + 2, prefill=64)):
        both.record(stats)
    assert set(both.refit()) == {PrefillModel.NAME, DecodeStepModel.NAME}
    assert both.prefill is not None and both.prefill.fit().num_samples == 4  # every step ran tokens
    assert both.decode_step is not None and both.decode_step.fit().num_samples == 2  # not the mixed ones
    assert both.mixed_step is None
    only_prefill = StepModels(fits_prefill=True, fits_decode=False)
    assert only_prefill.decode_step is None


def test_the_mixed_step_model_takes_every_step_and_a_beat_publishes_it():
    store = MemoryStore()
    models = StepModels(fits_prefill=False, fits_decode=True, fits_mixed=True)
    for stats in (step(2, 300, prefill=300), step(4, 4), step(4, 12, drafts=8), step(3, 64 + 2, prefill=64)):
        models.record(stats)
    membership(store, models).beat()
    assert models.mixed_step is not None and models.mixed_step.fit().num_samples == 4
    assert models.decode_step is not None and models.decode_step.fit().num_samples == 2
    published = MixedStepModel.from_coefficients(store.get_models(MixedStepModel.NAME)["w0"])
    assert published.predict(3, 0, 30, 64, 0) == pytest.approx(models.mixed_step.predict(3, 0, 30, 64, 0))


def test_heartbeat_keeps_beating_through_failures_and_stops():
    import threading

    beats = threading.Semaphore(0)
    count = {"n": 0}

    def beat() -> None:
        count["n"] += 1
        beats.release()
        if count["n"] == 1:
            raise ConnectionError("first beat fails")

    heartbeat = Heartbeat("hb-test", 0.01, beat)
    heartbeat.start()
    assert all(beats.acquire(timeout=30) for _ in range(3)), "it went on after a failed beat"
    heartbeat.stop()
    n = count["n"]
    assert not heartbeat._thread.is_alive() and count["n"] == n


def test_profile_plans_a_batch_prompts_joining_decodes_then_one_request_per_k(loaded):
    from splitserve.config import EngineConfig, SpeculativeConfig
    from splitserve.engine.engine import LLMEngine
    from splitserve.worker.profile import profile_phases, run_profile

    plain = LLMEngine(EngineConfig(num_kv_blocks=128), loaded=loaded)
    assert len(profile_phases(plain)) == 2
    spec = LLMEngine(EngineConfig(num_kv_blocks=128, speculative=SpeculativeConfig("ngram", max_speculative_tokens=6)),
                     loaded=loaded)
    phases = profile_phases(spec)
    assert [plans[0].k for plans in phases[2:]] == [0, 1, 2, 4, 6] and all(len(p) == 1 for p in phases[2:])
    joining = [p for p in phases[1] if p.start_step > 0]
    assert len({len(p.prompt) for p in joining}) == 3, "prompts of several lengths join the decodes"
    assert any(p.max_chunk_tokens is not None and p.max_chunk_tokens < len(p.prompt) for p in joining)
    steps = run_profile(spec, "profile")
    assert any(s.num_requests == 1 and s.num_draft_tokens >= 4 for s in steps), "drafting at batch 1 was measured"
    mixed = [s for s in steps if s.num_prefill_tokens and s.num_batched_tokens - s.num_prefill_tokens >= 4]
    assert len(mixed) >= 4, "prompt chunks ran beside the decodes"
    assert any(s.prefill_attention > s.num_prefill_tokens**2 for s in mixed), "a capped prompt's later chunk"
    assert not spec.has_unfinished_requests() and spec.block_pool.num_free_blocks == spec.block_pool.num_blocks



def output(num_tokens: int, total: int, finished: bool = False) -> RequestOutput:
    """A step's output for request "r": ``num_tokens`` new, ``total`` so far."""
    return RequestOutput("r", [1, 2], list(range(total)), "", list(range(total - num_tokens, total)),
                         "t" * num_tokens, finished, FinishReason.LENGTH if finished else None, 0.0, None, None,
                         SpecStats(0, 0, 0))


class StreamsOnly:
    """The one EngineLoop method stream_deltas calls."""

    def close_stream(self, request_id: str) -> None:
        pass


@pytest.mark.parametrize(("interval", "sizes"), [(1, [1, 1, 1, 1, 1, 1, 1]), (3, [1, 3, 3]), (4, [1, 4, 2])])
def test_tokens_stream_in_messages_of_the_interval_the_first_and_the_last_at_once(interval, sizes):
    async def run() -> list[GenerateDelta]:
        stream: asyncio.Queue = asyncio.Queue()

        async def read() -> list[GenerateDelta]:
            return [d async for d in stream_deltas(StreamsOnly(), "r", stream, abort=None, interval=interval)]

        reader = asyncio.create_task(read())
        for total in range(1, 8):  # a token a step, the reader waiting each time
            stream.put_nowait(output(1, total, finished=total == 7))
            for _ in range(3):
                await asyncio.sleep(0)
        return await reader

    deltas = asyncio.run(run())
    assert [len(d.token_ids) for d in deltas] == sizes
    assert [t for d in deltas for t in d.token_ids] == list(range(7)) and deltas[-1].finished


def test_an_auto_transfer_host_becomes_the_node_s_own_address():
    import ray

    from splitserve.config import TransferConfig, WorkerConfig
    from splitserve.worker_actor import on_this_node

    fixed = WorkerConfig("w", "decode", transfer=TransferConfig(host="198.18.0.2"))
    assert on_this_node(fixed) is fixed
    auto = on_this_node(WorkerConfig("w", "decode", transfer=TransferConfig(host="auto")))
    assert auto.transfer.host == ray.util.get_node_ip_address() != "auto"


# --------------------------------------------------------------------------- stream leases

def _leases() -> tuple[StreamLeases, list[str]]:
    aborted: list[str] = []

    async def abort(request_id: str) -> None:
        aborted.append(request_id)

    return StreamLeases("w0", abort), aborted


def test_a_silent_owner_loses_its_requests_and_no_one_else_s():
    async def run() -> tuple[list[str], StreamLeases]:
        leases, aborted = _leases()
        silent, alive = StreamLease("router-a", 0.01), StreamLease("router-b", 3600.0)
        leases.hold("a1", silent)
        leases.hold("a2", silent)
        leases.hold("b1", alive)
        leases.hold("free", None)  # no lease: never aborted for silence
        for _ in range(1000):
            if len(aborted) == 2:
                break
            await asyncio.sleep(0.01)
        return aborted, leases

    aborted, leases = asyncio.run(run())
    assert sorted(aborted) == ["a1", "a2"]
    assert leases.num_expired == 2 and leases.num_held() == 1


def test_an_owner_with_nothing_left_here_is_forgotten_and_its_lease_cannot_fire():
    async def run() -> tuple[list[str], int]:
        leases, aborted = _leases()
        lease = StreamLease("router-a", 0.01)
        leases.hold("a1", lease)
        leases.release("a1", lease)
        leases.release("a1", lease)  # twice, or never held: nothing happens
        leases.release("zz", StreamLease("router-z", 1.0))
        await asyncio.sleep(0.1)
        return aborted, leases.renew("router-a")

    assert asyncio.run(run()) == ([], 0)


def test_a_renewal_moves_the_owner_s_deadline_and_counts_what_it_holds():
    async def run() -> tuple[int, int, bool]:
        leases, _ = _leases()
        lease = StreamLease("router-a", 3600.0)
        leases.hold("a1", lease)
        leases.hold("a2", lease)
        before = leases._expiry["router-a"].when()
        await asyncio.sleep(0.01)
        held = leases.renew("router-a")
        return held, leases.renew("router-unknown"), leases._expiry["router-a"].when() > before

    assert asyncio.run(run()) == (2, 0, True)


@pytest.mark.parametrize("lease_s", [0.0, -1.0, float("inf")])
def test_a_stream_lease_needs_a_positive_finite_length(lease_s):
    with pytest.raises(ValueError, match="lease_s"):
        StreamLease("router-a", lease_s)


class StepsOnly:
    """The engine as EngineLoop sees it: ``steps`` steps of work, queued by ``add``."""

    def __init__(self) -> None:
        self.steps_left = 0
        self.step_stats: list[StepStats] = []
        self.scheduler = type("Scheduler", (), {"waiting": (), "num_unfinished": 0})()
        self.block_pool = BlockPool(4, 16)
        self.num_reserved = 0

    def add(self, steps: int) -> None:
        self.steps_left += steps

    def has_unfinished_requests(self) -> bool:
        return self.steps_left > 0

    def step(self) -> list[RequestOutput]:
        self.steps_left -= 1
        return []


@pytest.mark.parametrize("every_s", [0.01, None])
def test_a_worker_hands_freed_memory_back_after_it_stepped_and_not_again_while_idle(
        every_s: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    import splitserve.worker.engine_loop as engine_loop

    releases: list[int] = []
    monkeypatch.setattr(engine_loop, "release_free_memory", lambda: releases.append(1) or True)
    engine = StepsOnly()

    async def run() -> int:
        loop = engine_loop.EngineLoop(engine, release_memory_every_s=every_s)  # type: ignore[arg-type]
        loop.start(asyncio.get_running_loop())
        await asyncio.sleep(0.05)
        assert releases == []  # it has not stepped yet: nothing to hand back, and it stays asleep
        await loop.call(engine.add, 3)
        for _ in range(500):  # up to 5 s for the steps, and the idle thread's release after them
            if engine.steps_left == 0 and loop._release_wait_s() is None:
                break
            await asyncio.sleep(0.01)
        released = len(releases)
        await asyncio.sleep(0.1)  # idle since: nothing more to hand back
        assert engine.steps_left == 0 and loop.num_memory_releases == released == len(releases)
        loop.stop()
        return released

    released = asyncio.run(run())
    assert released >= 1 if every_s else released == 0


def test_the_c_library_can_hand_free_memory_back() -> None:
    from splitserve.worker.memory import can_release, release_free_memory

    assert can_release()  # glibc (the image and CI run on it)
    assert isinstance(release_free_memory(), bool)
