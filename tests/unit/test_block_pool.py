"""BlockPool: ref counts, the LRU queue of free blocks, prefix-hash lookup and eviction."""

from __future__ import annotations

import pytest

from splitserve.engine.block_pool import BlockPool, hash_block_tokens


def h(*tokens: int, parent: bytes | None = None) -> bytes:
    return hash_block_tokens(parent, list(tokens))


def assert_consistent(pool: BlockPool) -> None:
    """Free blocks are exactly the unreferenced ones; every cached hash names its block."""
    free = {b.block_id for b in pool.blocks if b.ref_count == 0}
    assert pool.num_free_blocks == len(free)
    assert all(b.ref_count >= 0 for b in pool.blocks)
    for block in pool.blocks:
        if block.block_hash is not None:
            assert pool.lookup(block.block_hash) == block.block_id


def test_rejects_empty_pool():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(4, 0)


def test_allocate_free_and_ref_counts():
    pool = BlockPool(8, 4)
    assert pool.num_free_blocks == 8
    a = pool.allocate(3)
    b = pool.allocate(2)
    assert len(set(a) | set(b)) == 5, "a block was handed out twice"
    assert pool.num_free_blocks == 3
    assert all(pool.blocks[i].ref_count == 1 for i in a + b)
    assert pool.can_allocate(3) and not pool.can_allocate(4)

    pool.touch(a[:2])  # a second request shares a's first two blocks
    assert [pool.blocks[i].ref_count for i in a] == [2, 2, 1]
    pool.free(a)
    assert [pool.blocks[i].ref_count for i in a] == [1, 1, 0]
    assert pool.num_free_blocks == 4  # only the unshared block came back
    pool.free(a[:2])
    pool.free(b)
    assert pool.num_free_blocks == 8
    assert all(block.ref_count == 0 for block in pool.blocks)
    assert_consistent(pool)


def test_free_more_often_than_taken_is_caught():
    pool = BlockPool(2, 4)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(AssertionError, match="freed more often"):
        pool.free([block])


def test_allocate_without_room_is_caught():
    pool = BlockPool(2, 4)
    with pytest.raises(AssertionError, match="3 blocks, 2 free"):
        pool.allocate(3)


def test_free_count_returns_to_num_blocks_after_churn():
    pool = BlockPool(16, 2)
    held: list[list[int]] = []
    for n in [3, 1, 4, 1, 5]:
        held.append(pool.allocate(n))
        pool.cache_block(held[-1][0], h(len(held)))
    pool.touch(held[2])
    pool.free(held.pop(0))
    held.append(pool.allocate(2))  # evicts cached content of the first request
    for ids in held:
        pool.free(ids)
    pool.free(held[1])  # the touch taken on the third request
    assert pool.num_free_blocks == pool.num_blocks
    assert_consistent(pool)


def test_freed_blocks_are_evicted_lru_tail_blocks_first():
    pool = BlockPool(6, 2)
    a = pool.allocate(3)  # [0, 1, 2]
    b = pool.allocate(2)  # [3, 4]
    assert (a, b) == ([0, 1, 2], [3, 4])
    pool.free(a)  # queue: 5, then a's tail first: 2, 1, 0
    pool.free(b)  # then 4, 3
    order = [pool.allocate(1)[0] for _ in range(6)]
    assert order == [5, 2, 1, 0, 4, 3]


def test_prefix_lookup_hits_until_the_block_is_evicted():
    pool = BlockPool(4, 2)
    a = pool.allocate(2)
    first, second = h(1, 2), h(3, 4, parent=h(1, 2))
    pool.cache_block(a[0], first)
    pool.cache_block(a[1], second)
    assert pool.lookup(first) == a[0] and pool.lookup(second) == a[1]

    pool.free(a)  # free, but the content stays findable
    assert pool.num_free_blocks == 4
    assert pool.lookup(first) == a[0] and pool.lookup(second) == a[1]

    pool.allocate(2)  # the never-used blocks go first
    assert pool.lookup(first) == a[0] and pool.lookup(second) == a[1]
    (evicted,) = pool.allocate(1)  # the tail block of a is the least valuable
    assert evicted == a[1]
    assert pool.lookup(second) is None
    assert pool.blocks[evicted].block_hash is None
    assert pool.lookup(first) == a[0]
    (evicted,) = pool.allocate(1)
    assert evicted == a[0] and pool.lookup(first) is None
    assert_consistent(pool)


def test_touch_of_a_free_cached_block_takes_it_off_the_free_queue():
    pool = BlockPool(3, 2)
    (block,) = pool.allocate(1)
    pool.cache_block(block, h(7, 7))
    pool.free([block])
    assert pool.num_free_blocks == 3

    pool.touch([pool.lookup(h(7, 7))])  # a prefix hit revives it
    assert pool.blocks[block].ref_count == 1
    assert pool.num_free_blocks == 2
    others = pool.allocate(2)
    assert block not in others, "a revived block was handed out again"
    assert pool.lookup(h(7, 7)) == block, "a revived block lost its content"
    assert not pool.can_allocate(1)
    pool.free(others + [block])
    assert pool.num_free_blocks == 3


def test_cache_block_keeps_the_first_copy_of_identical_content():
    pool = BlockPool(4, 2)
    a, b = pool.allocate(2)
    pool.cache_block(a, h(1, 1))
    pool.cache_block(b, h(1, 1))
    assert pool.lookup(h(1, 1)) == a
    assert pool.blocks[b].block_hash is None
    pool.cache_block(a, h(2, 2))  # a block holds one content; it is not renamed
    assert pool.lookup(h(2, 2)) is None and pool.lookup(h(1, 1)) == a


def test_cache_block_does_nothing_without_prefix_caching():
    pool = BlockPool(4, 2, enable_prefix_caching=False)
    (block,) = pool.allocate(1)
    pool.cache_block(block, h(1, 2))
    assert pool.blocks[block].block_hash is None
    assert pool.lookup(h(1, 2)) is None
    pool.free([block])
    assert pool.lookup(h(1, 2)) is None


def test_uncache_block_forgets_content():
    pool = BlockPool(2, 2)
    (block,) = pool.allocate(1)
    pool.cache_block(block, h(5, 6))
    pool.uncache_block(block)
    assert pool.lookup(h(5, 6)) is None and pool.blocks[block].block_hash is None
    pool.uncache_block(block)  # harmless when there is nothing to forget
    pool.cache_block(block, h(8, 9))  # the block can be cached again with its new content
    assert pool.lookup(h(8, 9)) == block


def test_reset_prefix_cache_forgets_everything():
    pool = BlockPool(2, 2)
    ids = pool.allocate(2)
    pool.cache_block(ids[0], h(1, 2))
    pool.cache_block(ids[1], h(3, 4))
    pool.reset_prefix_cache()
    assert pool.lookup(h(1, 2)) is None and pool.lookup(h(3, 4)) is None
    assert all(block.block_hash is None for block in pool.blocks)


def test_hash_block_tokens_is_chained_and_stable():
    root = h(1, 2, 3)
    assert root == hash_block_tokens(None, [1, 2, 3]) == hash_block_tokens(None, (1, 2, 3))
    assert isinstance(root, bytes) and len(root) == 16
    # Same block tokens under different parents: different prefixes, different hashes.
    under_a = h(4, 5, 6, parent=h(1, 2, 3))
    under_b = h(4, 5, 6, parent=h(1, 2, 4))
    assert len({under_a, under_b, h(4, 5, 6)}) == 3
    assert under_a == h(4, 5, 6, parent=h(1, 2, 3))
    # Order and length of the tokens matter; large ids are not truncated.
    assert h(1, 2) != h(2, 1) and h(1, 2) != h(1, 2, 0)
    assert h(2**40) != h(2**40 + 1)
    # A fixed digest, not Python's salted hash(): other processes compute the same value.
    assert root.hex() == "abccad42d03c940bc2b249bf5a4e1e3d"


def test_cache_changes_are_reported_for_the_shared_prefix_index():
    pool = BlockPool(2, 4)
    events = []
    pool.on_cache_change = lambda h, cached: events.append((h, cached))
    [a] = pool.allocate(1)
    pool.cache_block(a, b"x")
    pool.cache_block(a, b"x")  # already cached: no second event
    pool.free([a])
    assert events == [(b"x", True)]
    pool.allocate(2)  # evicts the cached block for new content
    assert events == [(b"x", True), (b"x", False)]
