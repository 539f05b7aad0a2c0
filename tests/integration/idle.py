"""``assert_idle``: after a fault, nothing is left behind -- the one check every fault test ends with.

Every live worker's KV blocks are all free and it holds no request (running, waiting or
reserved: a reservation counts as unfinished); the router has nothing in flight at any worker
(requests or queued prompt tokens) and its gauges of waiting and running requests read 0.
Aborts travel asynchronously, so it polls until ``timeout_s``.

``Footprint``: the threads and open file descriptors of the router's process (this one) and of
every live worker's, taken before a fault; ``assert_idle(..., baseline=)`` then also waits until
no count exceeds its baseline by more than a little (pools that grow on demand, a reconnect):
a thread or descriptor left per request stands out over tens of requests. With a Redis store
it also waits until the store holds nothing of a worker that is not live (its membership, load,
blocks, models, prefix-index entries) and no lease: what a fault leaves behind there.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import ray
import redis

from splitserve.server import Server

THREADS_SLACK, FDS_SLACK = 4, 8


def _counts() -> tuple[int, int]:
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


@dataclass(frozen=True)
class Footprint:
    """(threads, open fds) per process: ``router`` (this process) and each live worker's id."""

    counts: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, server: Server, dead: frozenset[str] = frozenset()) -> Footprint:
        live = {w: h for w, h in server.deployment.handles.items() if w not in dead}
        # (written out: Ray ships the lambda by value, and a worker need not import this module)
        calls = [h.__ray_call__.remote(lambda actor: (len(os.listdir("/proc/self/task")),
                                                      len(os.listdir("/proc/self/fd")))) for h in live.values()]
        workers = ray.get(calls, timeout=30)
        return cls({"router": _counts(), **dict(zip(live, workers, strict=True))})

    def excess(self, baseline: Footprint) -> dict[str, tuple[int, int]]:
        """Processes with more threads or fds than ``baseline`` allows: name -> (threads, fds) over it."""
        over = {name: (threads - baseline.counts[name][0], fds - baseline.counts[name][1])
                for name, (threads, fds) in self.counts.items() if name in baseline.counts}
        return {name: d for name, d in over.items() if d[0] > THREADS_SLACK or d[1] > FDS_SLACK}


def store_leftovers(server: Server, live: set[str]) -> list[str]:
    """Redis keys (and entries) of ``server``'s store prefix that belong to no worker in ``live``,
    or to a lease; [] with the embedded store (the contract test covers its expiry)."""
    url, prefix = server.config.store.redis_url, server.config.store.prefix
    if url is None:
        return []
    client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
    left: list[str] = []
    try:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            kind, _, name = key[len(prefix) + 1:].partition(":")
            if kind == "lease":
                left.append(key)
            elif kind in ("worker", "blocks", "model_names") and name not in live:
                left.append(key)
            elif kind in ("workers", "prefix"):
                left += [f"{key} {w}" for w in client.smembers(key) if w not in live]
            elif kind in ("loads", "model"):
                left += [f"{key} {w}" for w in client.hkeys(key) if w not in live]
    finally:
        client.close()
    return left


def assert_idle(server: Server, *, dead: frozenset[str] = frozenset(), baseline: Footprint | None = None,
                timeout_s: float = 60.0) -> None:
    """Poll until ``server`` is idle (``dead``: workers killed on purpose, not asked) and, given a
    ``baseline``, its processes hold no more threads and fds than it allows; AssertionError naming
    what is left after ``timeout_s``."""
    live = {w: h for w, h in server.deployment.handles.items() if w not in dead}
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = dict(zip(live, ray.get([h.status.remote() for h in live.values()], timeout=30), strict=True))
        view = server.router.view
        left = {
            "workers": {w: s for w, s in statuses.items() if not s.is_idle},
            "router in flight": {w: n for w, n in view.inflight.items() if n},
            "router queued prompt tokens": {w: n for w, n in view.inflight_tokens.items() if n},
            "router waiting/running": (server.router._num_waiting, server.router._num_running),
            "threads and fds over the baseline":
                {} if baseline is None else Footprint.of(server, dead).excess(baseline),
            "store entries of no live worker": store_leftovers(server, set(live)),
        }
        if not any(left[k] for k in ("workers", "router in flight", "router queued prompt tokens",
                                     "threads and fds over the baseline", "store entries of no live worker")) and \
                left["router waiting/running"] == (0, 0):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle after {timeout_s:g} s: {left}")
        time.sleep(0.1)
