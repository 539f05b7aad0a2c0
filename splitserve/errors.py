"""Errors that cross component boundaries, each with the status a front end answers with.

Bad input is always a plain ``ValueError`` (INVALID_ARGUMENT / HTTP 400).
"""

from __future__ import annotations


class CapacityError(RuntimeError):
    """Nothing can take the request now: no free KV blocks, no free sequence slot, or admission
    refused it (RESOURCE_EXHAUSTED / HTTP 429). Retrying later, or elsewhere, may succeed."""


class ServingError(RuntimeError):
    """An accepted request failed: a worker died, the KV handoff failed after retries, or the
    server is shutting down (UNAVAILABLE / HTTP 503)."""
