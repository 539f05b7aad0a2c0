"""Errors that cross component boundaries, each with the status a front end answers with.

Bad input is always a plain ``ValueError`` (INVALID_ARGUMENT / HTTP 400).
"""

from __future__ import annotations

import math


class CapacityError(RuntimeError):
    """Nothing can take the request now: no free KV blocks, no free sequence slot, or admission
    refused it (RESOURCE_EXHAUSTED / HTTP 429). Retrying later, or elsewhere, may succeed.

    retry_after_s: when a retry may succeed, in seconds from now (None: no hint); the front ends
    send it as gRPC's ``grpc-retry-pushback-ms`` trailer and HTTP's ``Retry-After`` header.
    """

    def __init__(self, message: str, retry_after_s: float | None = None):
        if not (retry_after_s is None or 0 <= retry_after_s < math.inf):  # the front ends round it
            raise ValueError(f"retry_after_s must be None or finite seconds >= 0, got {retry_after_s!r}")
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServingError(RuntimeError):
    """An accepted request failed: a worker died, the KV handoff failed after retries, or the
    server is shutting down (UNAVAILABLE / HTTP 503)."""


class WorkerGone(ServingError):
    """A worker died or cannot be reached (its Ray actor is dead or unavailable): what a router
    holds there is lost, and the worker takes nothing more until it is seen alive again."""

    def __init__(self, worker_id: str, message: str):
        super().__init__(message)
        self.worker_id = worker_id

    def __reduce__(self):  # picklable with both arguments (Ray carries errors between processes)
        return type(self), (self.worker_id, str(self))


class StreamLost(WorkerGone):
    """A worker's stream of a request stopped short though the worker lives: it no longer
    holds the request, yet the stream never ended. The request moves on as from a dead worker;
    the worker stays in the pools."""
