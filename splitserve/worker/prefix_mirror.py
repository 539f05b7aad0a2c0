"""PrefixMirror: a worker's prefix cache, mirrored into the store's shared prefix index.

The engine's BlockPool reports each block hash it caches or evicts (on the engine thread);
the mirror queues those events and, on each heartbeat, turns them into the net additions and
removals since the last publish. It knows the hashes only, never the blocks or the store's
layout; routers read the index to send a prompt where its prefix is already cached.
"""

from __future__ import annotations

from collections import deque

from splitserve.cluster.store import MetadataStore
from splitserve.engine.block_pool import BlockPool


class PrefixMirror:
    def __init__(self, block_pool: BlockPool):
        self._events: deque[tuple[bytes, bool]] = deque()  # appended on the engine thread
        self._published: set[bytes] = set()
        block_pool.on_cache_change = lambda h, cached: self._events.append((h, cached))

    def publish(self, store: MetadataStore, worker_id: str, is_fresh: bool) -> None:
        """Send the changes since the last call; ``is_fresh``: the membership was just
        (re)registered, which wiped the worker's index entries, so everything is sent."""
        added, removed = self._changes()
        if is_fresh:
            added, removed = list(self._published), []
        if removed:
            store.remove_prefix_blocks(worker_id, removed)
        if added:
            store.add_prefix_blocks(worker_id, added)

    def discard_pending(self) -> None:
        """Forget queued events (the startup profile's blocks, dropped from the cache)."""
        self._events.clear()

    def _changes(self) -> tuple[list[bytes], list[bytes]]:
        latest: dict[bytes, bool] = {}
        while self._events:
            block_hash, cached = self._events.popleft()
            latest[block_hash] = cached
        added = [h for h, cached in latest.items() if cached and h not in self._published]
        removed = [h for h, cached in latest.items() if not cached and h in self._published]
        self._published.update(added)
        self._published.difference_update(removed)
        return added, removed
