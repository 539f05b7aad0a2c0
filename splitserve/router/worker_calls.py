"""Calling workers from the router: a ``Visit`` counts a request in flight at one worker until
it leaves, and aborts it there when it leaves before the worker finished it (cancel, error, a
released reservation), which frees its blocks. (The calls themselves go through
``ClusterView.call``, which learns from them which workers are gone.)
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from splitserve.router.cluster_view import ClusterView


@dataclass
class Visit:
    """A request at one worker: counted in flight there from creation until ``leave``."""

    view: ClusterView
    worker_id: str
    handle: Any
    request_id: str
    finished: bool = False  # the worker is done with it: leaving needs no abort

    def __post_init__(self) -> None:
        self.view.inflight[self.worker_id] += 1

    async def leave(self) -> None:
        self.view.inflight[self.worker_id] -= 1
        if not self.finished:
            with contextlib.suppress(Exception):  # the worker may be gone; its blocks went with it
                await asyncio.shield(self.view.call(self.handle.abort.remote(self.request_id), self.worker_id))


def no_worker(kind: str, errors: list[str]) -> str:
    detail = f" (last refusal: {errors[-1]})" if errors else ""
    return f"no {kind} worker can take the request now{detail}"
