"""ClusterView on a real in-memory store: a call that finds a worker dead or unreachable takes
it out of every pool at once (the first sign, before its membership lapses), until the store
lists a new start of it or drops it, or the exclusion's time passes; a worker's own errors come
back as they were raised. And the router's OwnerLease, renewed through it at the workers where
requests are in flight, and ``watched``, which asks a silent stream's worker whether it still
holds the request (driven by the checks themselves, never by how fast this machine is)."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorUnavailableError, RayActorError

from splitserve.cluster.embedded_store import MemoryStore
from splitserve.cluster.store import WorkerInfo
from splitserve.errors import ServingError, WorkerGone
from splitserve.protocol import GenerateDelta
from splitserve.router.cluster_view import ClusterView
from splitserve.router.worker_calls import OwnerLease, watched


def _info(worker_id: str, started_at: float) -> WorkerInfo:
    return WorkerInfo(worker_id, "decode", "", "", "node", started_at=started_at)


async def _raising(error: BaseException):
    raise error


@pytest.mark.parametrize("error", [RayActorError(), ActorUnavailableError("unreachable", None)],
                         ids=["died", "unreachable"])
def test_a_worker_a_call_finds_gone_leaves_the_pools_until_it_starts_again(error):
    store, now = MemoryStore(), [0.0]
    store.register_worker(_info("a", 100.0), ttl_s=600)
    store.register_worker(_info("b", 100.0), ttl_s=600)
    view = ClusterView(store, get_actor=lambda name: object(), gone_s=10.0, clock=lambda: now[0])

    async def scenario() -> None:
        await view.refresh(force=True)
        handle = view.handle("a")
        with pytest.raises(WorkerGone, match="worker a died or cannot be reached") as e:
            await view.call(_raising(error), "a")
        assert e.value.worker_id == "a" and isinstance(e.value, ServingError)
        assert view.members("decode") == ["b"]  # at once, though the store still lists it
        await view.refresh(force=True)
        assert view.members("decode") == ["b"]  # the same start of it: still out
        assert view.handle("a") is not handle  # fetched anew
        store.register_worker(_info("a", 200.0), ttl_s=600)  # it started again
        await view.refresh(force=True)
        assert sorted(view.members("decode")) == ["a", "b"]
        with pytest.raises(WorkerGone):
            await view.call(_raising(error), "a")
        now[0] += 10.0
        await view.refresh(force=True)
        # Dead: out until the store drops it or lists a new start. Only unreachable: back after gone_s.
        expected = ["a", "b"] if isinstance(error, ActorUnavailableError) else ["b"]
        assert sorted(view.members("decode")) == expected
        store.deregister_worker("a")  # its membership lapsed
        await view.refresh(force=True)
        store.register_worker(_info("a", 200.0), ttl_s=600)  # a worker of that name registers again
        await view.refresh(force=True)
        assert sorted(view.members("decode")) == ["a", "b"]

    asyncio.run(scenario())


def test_a_worker_gone_from_ray_but_listed_is_gone_and_its_own_errors_pass_through():
    store = MemoryStore()
    store.register_worker(_info("a", 1.0), ttl_s=600)

    def get_actor(name: str):
        raise ValueError(f"Failed to look up actor with name '{name}'")

    view = ClusterView(store, get_actor=get_actor)

    async def scenario() -> None:
        await view.refresh(force=True)
        with pytest.raises(WorkerGone, match="not reachable"):
            view.handle("a")
        assert view.members("decode") == []
        with pytest.raises(ValueError, match="bad prompt"):  # not a Ray error: as raised
            await view.call(_raising(ValueError("bad prompt")), "a")

    asyncio.run(scenario())


# ----------------------------------------------------------------- the router's owner lease

class _Renewals:
    """Worker handles whose ``renew_streams`` records each call (a frozen one never answers)."""

    def __init__(self, frozen: set[str]):
        self.calls: list[tuple[str, str]] = []
        self.frozen = frozen

    def handle(self, worker_id: str):
        renewals = self

        class Method:
            @staticmethod
            def remote(owner: str):
                renewals.calls.append((worker_id, owner))
                return asyncio.sleep(3600 if worker_id in renewals.frozen else 0, 1)

        return type("Handle", (), {"renew_streams": Method})()


def test_the_owner_lease_renews_where_requests_are_in_flight_past_a_frozen_worker_and_stops_when_none_are():
    store = MemoryStore()
    for worker_id in ("a", "b", "c"):
        store.register_worker(_info(worker_id, 100.0), ttl_s=600)
    renewals = _Renewals(frozen={"c"})
    view = ClusterView(store, get_actor=lambda name: renewals.handle(name.rsplit(".", 1)[-1]))

    async def scenario() -> tuple[set[str], bool]:
        await view.refresh(force=True)
        owner = OwnerLease(view, lease_s=0.06)
        view.inflight["a"], view.inflight["b"], view.inflight["c"] = 1, 0, 2
        assert owner.hold() == owner.lease and owner.lease.owner.startswith("router-")
        for _ in range(1000):  # the frozen worker costs a third of the lease, never the others' renewals
            if sum(1 for worker_id, _ in renewals.calls if worker_id == "a") >= 3:
                break
            await asyncio.sleep(0.01)
        view.inflight["a"] = view.inflight["c"] = 0
        task = owner._task
        await asyncio.wait_for(task, 60)  # nothing in flight: the renewals stop
        return {worker_id for worker_id, _ in renewals.calls}, {o for _, o in renewals.calls} == {owner.lease.owner}

    workers, one_owner = asyncio.run(scenario())
    assert workers == {"a", "c"} and one_owner


# ------------------------------------------------------------- a silent stream, checked

SILENCE_S = 0.01


class _Worker:
    """A worker's stream of one request and its answers to ``holds``: the stream releases its
    next delta once ``holds`` has been asked ``after_checks[i]`` times (then never, if that is
    None); ``answers`` says what each check answers (the last one repeats; "hang": never)."""

    def __init__(self, after_checks: list[int | None], answers: list[object]):
        self.after_checks, self.answers = after_checks, answers
        self.num_checks = 0
        self.closed = False
        self._asked = asyncio.Condition()

    async def deltas(self):
        try:
            for i, after in enumerate(self.after_checks):
                async with self._asked:
                    await self._asked.wait_for(lambda: after is not None and self.num_checks >= after)
                yield GenerateDelta("r1", [i], str(i), finished=i == len(self.after_checks) - 1)
        finally:
            self.closed = True

    async def holds(self) -> bool:
        answer = self.answers[min(self.num_checks, len(self.answers) - 1)]
        self.num_checks += 1
        async with self._asked:
            self._asked.notify_all()
        for _ in range(10):  # a delta it released reaches the watcher before this answer does
            await asyncio.sleep(0)
        if isinstance(answer, BaseException):
            raise answer
        if answer == "hang":
            await asyncio.sleep(3600)
        return answer


def _watch(worker: _Worker) -> list[int]:
    async def scenario() -> list[int]:
        return [t for d in [d async for d in watched(worker.deltas(), worker.holds, SILENCE_S, "w", "r1")]
                for t in d.token_ids]

    return asyncio.run(scenario())


def test_a_silent_stream_whose_worker_holds_the_request_waits_on():
    worker = _Worker(after_checks=[0, 3, 3], answers=[True])
    assert _watch(worker) == [0, 1, 2]
    assert worker.num_checks == 3 and worker.closed


def test_a_worker_that_twice_no_longer_holds_the_request_lost_the_stream():
    worker = _Worker(after_checks=[0, None], answers=[True, False])
    with pytest.raises(WorkerGone, match="lost the end of request r1's stream") as e:
        _watch(worker)
    assert e.value.worker_id == "w" and worker.num_checks == 3 and worker.closed


def test_a_delta_between_two_noes_keeps_the_stream():
    worker = _Worker(after_checks=[0, 1, 2, 3], answers=[False])  # a last delta in transit, each time
    assert _watch(worker) == [0, 1, 2, 3]


@pytest.mark.parametrize("answer", ["hang", RuntimeError("the call failed")], ids=["no answer", "an error"])
def test_a_check_without_an_answer_proves_nothing(answer):
    worker = _Worker(after_checks=[0, 4], answers=[answer])
    assert _watch(worker) == [0, 1]
    assert worker.num_checks == 4


def test_a_check_that_finds_the_worker_gone_fails_the_stream():
    worker = _Worker(after_checks=[0, None], answers=[WorkerGone("w", "worker w died or cannot be reached")])
    with pytest.raises(WorkerGone, match="died"):
        _watch(worker)
    assert worker.closed
