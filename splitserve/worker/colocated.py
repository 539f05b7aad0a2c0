"""ColocatedWorker: one engine doing prefill and decode for its requests (chunked prefill
mixes new prompts into the decode batches, Sarathi-style) -- the runtime's own ``generate``
and nothing else. The baseline every disaggregated benchmark compares against, and the
simplest deployment."""

from __future__ import annotations

from splitserve.worker.worker import Worker


class ColocatedWorker(Worker):
    """A Worker of kind "colocated" (its own class so the Ray actor is named for the role)."""
