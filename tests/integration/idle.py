"""``assert_idle``: after a fault, nothing is left behind -- the one check every fault test ends with.

Every live worker's KV blocks are all free and it holds no request (running, waiting or
reserved: a reservation counts as unfinished); the router has nothing in flight at any worker
(requests or queued prompt tokens) and its gauges of waiting and running requests read 0.
Aborts travel asynchronously, so it polls until ``timeout_s``.
"""

from __future__ import annotations

import time

import ray

from splitserve.server import Server


def assert_idle(server: Server, *, dead: frozenset[str] = frozenset(), timeout_s: float = 60.0) -> None:
    """Poll until ``server`` is idle (``dead``: workers killed on purpose, not asked); AssertionError
    naming what is left after ``timeout_s``."""
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
        }
        if not any(left[k] for k in ("workers", "router in flight", "router queued prompt tokens")) and \
                left["router waiting/running"] == (0, 0):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle after {timeout_s:g} s: {left}")
        time.sleep(0.1)
