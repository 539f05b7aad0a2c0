"""Ranking workers: predicted TTFT and TPOT per worker, from the latency models the workers
publish and the loads they report (pure functions; the Placer and the Handoff feed them).

- Prefill worker: predicted TTFT = its fitted prefill time of (prompt tokens queued there,
  including what this router sent and not yet finished, plus this prompt's tokens that are not
  already in its prefix cache). A repeated system prompt therefore goes where its blocks are.
- Decode worker: predicted TPOT = its fitted step time with one more request in the batch;
  workers that reported no room for the prompt's blocks are asked last. Among workers whose
  predictions are within ``CLOSE_TPOT`` of the best, the one holding most of the prompt's
  prefix in its cache goes first: it takes those blocks from its own cache, so less KV travels.

Where a prefill runs and whether a request is admitted at all is prefill_placement's decision,
made from these rankings and the decode workers' mixed-step models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from splitserve.cluster.store import WorkerLoad
from splitserve.engine.block_pool import hash_block_tokens
from splitserve.latency import DecodeStepModel, PrefillModel

CLOSE_TPOT = 0.05  # relative: decode workers predicted this close to the best count as equal


@dataclass(frozen=True)
class Choice:
    """One candidate worker with its prediction (inf when it has no model yet)."""

    worker_id: str
    predicted_s: float


def prompt_block_hashes(prompt_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The chained hashes of the prompt's full blocks (the shared prefix index's keys)."""
    hashes, parent = [], None
    for i in range(len(prompt_ids) // block_size):
        parent = hash_block_tokens(parent, prompt_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


def blocks_for(num_prompt_tokens: int, block_size: int) -> int:
    """The KV blocks a prompt needs on the worker that decodes it (its first output token included)."""
    return -(-(num_prompt_tokens + 1) // block_size)


def load_key(worker_id: str, inflight: int, load: WorkerLoad | None) -> tuple:
    """How loaded a worker is, least first: this router's requests in flight there, then what it
    reported (queued prompt tokens, running requests, free blocks: most first), then its id."""
    reported = (load.num_queued_prompt_tokens, load.num_running_requests, -load.num_free_blocks) if load else ()
    return (inflight, reported, worker_id)


def rank_prefill(
    worker_ids: Sequence[str],
    num_prompt_tokens: int,
    cached_blocks: Mapping[str, int],
    block_size: int,
    loads: Mapping[str, WorkerLoad],
    inflight_tokens: Mapping[str, int],
    models: Mapping[str, PrefillModel],
    avoid: frozenset[str] | set[str] = frozenset(),
) -> list[Choice]:
    """Prefill workers by predicted TTFT, best first (``avoid``: tried already, last)."""
    choices = []
    for worker_id in worker_ids:
        hit = min(cached_blocks.get(worker_id, 0) * block_size, num_prompt_tokens - 1)
        load = loads.get(worker_id)
        queued = max(load.num_queued_prompt_tokens if load else 0, inflight_tokens.get(worker_id, 0))
        model = models.get(worker_id)
        predicted = math.inf if model is None else model.predict(queued + num_prompt_tokens - hit)
        choices.append(Choice(worker_id, predicted))
    return sorted(choices, key=lambda c: (c.worker_id in avoid, c.predicted_s, c.worker_id))


def rank_decode(
    worker_ids: Sequence[str],
    num_prompt_tokens: int,
    block_size: int,
    loads: Mapping[str, WorkerLoad],
    inflight: Mapping[str, int],
    models: Mapping[str, DecodeStepModel],
    avoid: frozenset[str] | set[str] = frozenset(),
    *,
    cached: Mapping[str, int] | None = None,
) -> list[Choice]:
    """Decode workers by predicted TPOT with one more request; those that reported too few free
    blocks for the prompt go last (their own answer, CapacityError or ValueError, is the truth).
    ``cached``: the prompt's blocks each worker holds (``MetadataStore.match_prefix``); the one
    holding most, among those predicted within ``CLOSE_TPOT`` of the first, moves first."""
    needed_blocks = blocks_for(num_prompt_tokens, block_size)
    choices = []
    full = set()
    for worker_id in worker_ids:
        load = loads.get(worker_id)
        if load is not None and load.num_free_blocks < needed_blocks:
            full.add(worker_id)
        batch = max(load.num_running_requests if load else 0, inflight.get(worker_id, 0)) + 1
        model = models.get(worker_id)
        context = batch * num_prompt_tokens  # the newcomer's prompt as the typical context
        predicted = math.inf if model is None else model.predict(batch, batch, context, 0)
        choices.append(Choice(worker_id, predicted))

    def group(c: Choice) -> tuple[bool, bool]:
        return c.worker_id in avoid, c.worker_id in full

    ranked = sorted(choices, key=lambda c: (group(c), c.predicted_s, c.worker_id))
    return _holder_first(ranked, cached or {}, group)


def _holder_first(ranked: list[Choice], cached: Mapping[str, int],
                  group: Callable[[Choice], tuple[bool, bool]]) -> list[Choice]:
    """``ranked`` with the worker holding most cached blocks moved first, among those in the first
    one's group predicted within ``CLOSE_TPOT`` of it (the first itself on a tie)."""
    if not ranked or not cached:
        return ranked
    best = ranked[0]
    equals = [c for c in ranked if group(c) == group(best) and c.predicted_s <= best.predicted_s * (1 + CLOSE_TPOT)]
    holder = max(equals, key=lambda c: cached.get(c.worker_id, 0))  # max keeps the first of equal counts
    return [holder] + [c for c in ranked if c is not holder]
