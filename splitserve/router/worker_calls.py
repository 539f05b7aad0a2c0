"""Calling workers from the router: ``call`` awaits a worker's Ray call with the worker's own
errors unwrapped (ValueError, CapacityError, ServingError) and a dead or failing worker turned
into ServingError; a ``Visit`` counts a request in flight at one worker until it leaves, and
aborts it there when it leaves before the worker finished it (cancel, error, a released
reservation), which frees its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError, RayTaskError

from splitserve.errors import CapacityError, ServingError
from splitserve.router.cluster_view import ClusterView


async def call(ref: Any, worker_id: str) -> Any:
    """Await a worker call; its own exception comes back unwrapped, a dead worker as ServingError."""
    try:
        return await ref
    except RayTaskError as e:
        cause = e.cause
        if isinstance(cause, ValueError | CapacityError | ServingError):
            raise type(cause)(*cause.args) from None
        raise ServingError(f"worker {worker_id} failed: {type(cause).__name__}: {cause}") from None
    except RayActorError as e:
        raise ServingError(f"worker {worker_id} died: {e}") from None


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
                await asyncio.shield(call(self.handle.abort.remote(self.request_id), self.worker_id))


def no_worker(kind: str, errors: list[str]) -> str:
    detail = f" (last refusal: {errors[-1]})" if errors else ""
    return f"no {kind} worker can take the request now{detail}"
