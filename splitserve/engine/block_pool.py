"""BlockPool: the KV blocks of one worker — free list, reference counts and prefix hashes.

It knows nothing of requests or tensors: ``kv_cache.KVCacheManager`` asks it for blocks and
gives them back. A block whose reference count drops to zero goes to the tail of the free
queue but keeps its content hash, so a later request with the same prefix can take it back
(a prefix-cache hit) until it is evicted from the head of the queue for new content.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained content hash of one full block: equal hashes mean equal whole prefixes.

    A stable digest (not Python's salted ``hash``) so that hashes mean the same thing in every
    process; the cluster's shared prefix index relies on that.
    """
    digest = hashlib.blake2b(parent_hash or b"", digest_size=16)
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return digest.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


class BlockPool:
    """Fixed-size KV blocks with reference counts and an LRU queue of free blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (least recently freed first); dict for O(1) removal.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}
        # Called with (hash, True) when content becomes reusable and (hash, False) when it is
        # forgotten: workers mirror their prefix cache into the cluster's shared index with it.
        self.on_cache_change: Callable[[bytes, bool], None] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` fresh blocks (evicting cached content). Check can_allocate first."""
        assert self.can_allocate(num_blocks), f"asked for {num_blocks} blocks, {len(self._free)} free"
        ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._forget(block)
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def lookup(self, block_hash: bytes) -> int | None:
        """The block holding this content, if any (used or free); does not take a reference."""
        return self._cached.get(block_hash) if self.enable_prefix_caching else None

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks (a prefix hit); free ones leave the free queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; blocks reaching zero become free (hash kept)."""
        for block_id in reversed(block_ids):  # tail blocks are evicted first: less shared
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more often than taken"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        """Record that a full block holds the content ``block_hash`` names."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self._cached:
            return  # already cached, or an identical block exists: keep the first
        block.block_hash = block_hash
        self._cached[block_hash] = block_id
        if self.on_cache_change is not None:
            self.on_cache_change(block_hash, True)

    def uncache_block(self, block_id: int) -> None:
        """Forget a block's content hash: its owner is about to overwrite part of it."""
        block = self.blocks[block_id]
        if block.block_hash is not None:
            self._forget(block)

    def reset_prefix_cache(self) -> None:
        """Forget all cached content hashes (weights changed, or for tests)."""
        for block in self.blocks:
            if block.block_hash is not None:
                self._forget(block)

    def _forget(self, block: Block) -> None:
        assert block.block_hash is not None
        del self._cached[block.block_hash]
        if self.on_cache_change is not None:
            self.on_cache_change(block.block_hash, False)
        block.block_hash = None
