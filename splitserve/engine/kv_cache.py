"""KVCacheManager: each request's block table, on top of the BlockPool.

The scheduler calls it with counts of tokens, never with tensors. Paired calls guard every
allocation (``can_allocate``/``allocate``, ``can_append``/``append``); running out of blocks is
an answer (False), not an exception, and the scheduler decides to queue or preempt.
"""

from __future__ import annotations

from collections.abc import Sequence

from splitserve.engine.block_pool import BlockPool, hash_block_tokens


class KVCacheManager:
    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block_size = pool.block_size
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # content hashes of the cached full blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables[request_id]

    def has_request(self, request_id: str) -> bool:
        return request_id in self._tables

    def find_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Blocks already holding the longest cached prefix of ``token_ids`` (full blocks only).

        At least one token is left out so the request still computes the logits it samples from.
        """
        blocks: list[int] = []
        parent: bytes | None = None
        num_full = (len(token_ids) - 1) // self.block_size
        for i in range(num_full):
            parent = hash_block_tokens(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            block_id = self.pool.lookup(parent)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def can_allocate(self, num_tokens: int, prefix_blocks: Sequence[int] = ()) -> bool:
        """Whether a new request can hold ``num_tokens`` tokens, reusing ``prefix_blocks``."""
        revived = sum(1 for b in prefix_blocks if self.pool.blocks[b].ref_count == 0)
        fresh = max(self.num_blocks_for(num_tokens) - len(prefix_blocks), 0)
        return self.pool.can_allocate(fresh + revived)

    def allocate(self, request_id: str, num_tokens: int, prefix_blocks: Sequence[int] = ()) -> None:
        assert request_id not in self._tables, f"request {request_id} already has blocks"
        assert self.can_allocate(num_tokens, prefix_blocks), "allocate without can_allocate"
        self.pool.touch(prefix_blocks)
        fresh = max(self.num_blocks_for(num_tokens) - len(prefix_blocks), 0)
        self._tables[request_id] = list(prefix_blocks) + self.pool.allocate(fresh)
        self._hashes[request_id] = []
        self._rehash_prefix(request_id, len(prefix_blocks))

    def can_append(self, request_id: str, num_tokens: int) -> bool:
        """Whether the request can grow to hold ``num_tokens`` tokens in all."""
        extra = self.num_blocks_for(num_tokens) - len(self._tables[request_id])
        return self.pool.can_allocate(max(extra, 0))

    def append(self, request_id: str, num_tokens: int) -> None:
        assert self.can_append(request_id, num_tokens), "append without can_append"
        table = self._tables[request_id]
        extra = self.num_blocks_for(num_tokens) - len(table)
        if extra > 0:
            table.extend(self.pool.allocate(extra))

    def truncate(self, request_id: str, num_tokens: int) -> None:
        """Shrink the request to ``num_tokens`` tokens (rejected speculative slots roll back)."""
        table = self._tables[request_id]
        keep = self.num_blocks_for(num_tokens)
        if keep < len(table):
            self.pool.free(table[keep:])
            del table[keep:]
        if num_tokens % self.block_size and keep <= len(table):
            # The last kept block is no longer full and its tail will be rewritten: a prefix hit
            # on its old hash would read the new tokens' K/V.
            self.pool.uncache_block(table[keep - 1])
        hashes = self._hashes[request_id]
        del hashes[num_tokens // self.block_size :]

    def free(self, request_id: str) -> None:
        """Give back every block of the request (cached content stays reusable)."""
        table = self._tables.pop(request_id, None)
        self._hashes.pop(request_id, None)
        if table is not None:
            self.pool.free(table)

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Publish the content hashes of blocks that became full of computed tokens."""
        table, hashes = self._tables[request_id], self._hashes[request_id]
        num_full = min(num_computed_tokens // self.block_size, len(table))
        for i in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else None
            block_hash = hash_block_tokens(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            hashes.append(block_hash)
            self.pool.cache_block(table[i], block_hash)

    def _rehash_prefix(self, request_id: str, num_blocks: int) -> None:
        """Prefix blocks came from the cache, so their hashes are the chain's start."""
        table, hashes = self._tables[request_id], self._hashes[request_id]
        for block_id in table[:num_blocks]:
            block_hash = self.pool.blocks[block_id].block_hash
            assert block_hash is not None, f"prefix block {block_id} has no content hash"
            hashes.append(block_hash)
