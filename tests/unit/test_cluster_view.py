"""ClusterView on a real in-memory store: a call that finds a worker dead or unreachable takes
it out of every pool at once (the first sign, before its membership lapses), until the store
lists a new start of it or drops it, or the exclusion's time passes; a worker's own errors come
back as they were raised."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorUnavailableError, RayActorError

from splitserve.cluster.embedded_store import MemoryStore
from splitserve.cluster.store import WorkerInfo
from splitserve.errors import ServingError, WorkerGone
from splitserve.router.cluster_view import ClusterView


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
