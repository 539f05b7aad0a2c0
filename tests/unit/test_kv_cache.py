"""KVCacheManager: block tables, prefix hits, growth, speculative rollback, and no leaks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from splitserve.engine.block_pool import BlockPool, hash_block_tokens
from splitserve.engine.kv_cache import KVCacheManager


def make_kv(num_blocks: int = 16, block_size: int = 4, enable_prefix_caching: bool = True) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks, block_size, enable_prefix_caching))


def chain_hash(token_ids: list[int], num_blocks: int, block_size: int) -> bytes | None:
    """The content hash of the first ``num_blocks`` full blocks of ``token_ids``."""
    parent = None
    for i in range(num_blocks):
        parent = hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size])
    return parent


def run_prompt(kv: KVCacheManager, request_id: str, token_ids: list[int]) -> list[int]:
    """Allocate a prompt (reusing cached blocks), compute it, publish its full blocks."""
    prefix = kv.find_prefix(token_ids)
    assert kv.can_allocate(len(token_ids), prefix)
    kv.allocate(request_id, len(token_ids), prefix)
    kv.cache_full_blocks(request_id, token_ids, len(token_ids))
    return kv.block_table(request_id)


PROMPT = list(range(100, 113))  # 13 tokens: 3 full blocks of 4 and one partial


def test_find_prefix_returns_the_longest_chain_of_cached_full_blocks():
    kv = make_kv()
    table = run_prompt(kv, "a", PROMPT)
    assert kv.find_prefix(PROMPT) == table[:3]
    assert kv.find_prefix(PROMPT[:8] + [0, 0, 0, 0, 0]) == table[:2]
    assert kv.find_prefix(PROMPT[:4] + [0]) == table[:1]
    assert kv.find_prefix([0] + PROMPT[1:]) == []
    # Chained: the second block's tokens alone, at the start, are a different prefix.
    assert kv.find_prefix(PROMPT[4:]) == []


def test_find_prefix_stops_at_the_first_missing_block():
    kv = make_kv()
    table = run_prompt(kv, "a", PROMPT)
    kv.pool.uncache_block(table[1])  # as if evicted: blocks after it are unreachable
    assert kv.find_prefix(PROMPT) == table[:1]


def test_find_prefix_always_leaves_a_token_to_compute():
    kv = make_kv()
    table = run_prompt(kv, "a", PROMPT[:12])  # exactly 3 blocks, all cached
    assert kv.find_prefix(PROMPT[:12]) == table[:2], "a full hit would leave nothing to sample from"
    assert kv.find_prefix(PROMPT[:13]) == table[:3]
    assert kv.find_prefix(PROMPT[:4]) == []
    assert kv.find_prefix(PROMPT[:5]) == table[:1]
    assert kv.find_prefix(PROMPT[:1]) == []


def test_only_computed_blocks_are_published():
    kv = make_kv()
    kv.allocate("a", len(PROMPT))
    kv.cache_full_blocks("a", PROMPT, 6)  # a chunk of 6 tokens: only block 0 is full
    assert kv.find_prefix(PROMPT) == kv.block_table("a")[:1]
    kv.cache_full_blocks("a", PROMPT, 13)
    assert kv.find_prefix(PROMPT) == kv.block_table("a")[:3]


def test_second_request_with_the_same_prefix_reuses_the_same_blocks():
    kv = make_kv()
    a = list(run_prompt(kv, "a", PROMPT))
    free_before = kv.num_free_blocks
    b = run_prompt(kv, "b", PROMPT[:8] + [7, 7, 7])
    assert b[:2] == a[:2]
    assert b[2] not in a
    assert kv.num_free_blocks == free_before - 1, "only the unshared block is new"
    assert [kv.pool.blocks[i].ref_count for i in a] == [2, 2, 1, 1]

    kv.free("a")  # the shared blocks stay with b
    assert [kv.pool.blocks[i].ref_count for i in b] == [1, 1, 1]
    kv.free("b")
    c = run_prompt(kv, "c", PROMPT)  # all free now, still found by content
    assert c[:3] == a[:3]
    kv.free("c")
    assert kv.num_free_blocks == kv.pool.num_blocks


def test_no_prefix_reuse_without_prefix_caching():
    kv = make_kv(enable_prefix_caching=False)
    a = list(run_prompt(kv, "a", PROMPT))
    assert kv.find_prefix(PROMPT) == []
    b = run_prompt(kv, "b", PROMPT)
    assert not set(a) & set(b)


def test_can_allocate_counts_free_cached_prefix_blocks_as_used():
    kv = make_kv(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    kv.allocate("a", 4)
    kv.cache_full_blocks("a", tokens, 4)
    cached = kv.block_table("a")
    kv.free("a")
    kv.allocate("b", 4)  # takes the two never-used blocks; the cached ones stay free
    assert kv.num_free_blocks == 2
    prefix = kv.find_prefix(tokens)
    assert prefix == cached and all(kv.pool.blocks[i].ref_count == 0 for i in prefix)
    # 5 tokens = 3 blocks: 2 revived from the free queue + 1 fresh = 3 > 2 free.
    assert not kv.can_allocate(5, prefix)
    assert kv.can_allocate(4, prefix)  # fully covered by the 2 revived blocks
    kv.free("b")
    assert kv.can_allocate(5, prefix)
    kv.allocate("c", 5, prefix)
    assert kv.block_table("c")[:2] == cached
    assert kv.num_free_blocks == 1


def test_can_allocate_does_not_count_prefix_blocks_in_use():
    kv = make_kv(num_blocks=3, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    kv.allocate("a", 4)
    kv.cache_full_blocks("a", tokens, 4)
    prefix = kv.find_prefix(tokens)
    assert len(prefix) == 2 and kv.num_free_blocks == 1
    assert kv.can_allocate(5, prefix)  # shares a's 2 blocks, needs 1 fresh
    kv.allocate("b", 5, prefix)
    assert kv.num_free_blocks == 0


def test_append_grows_the_table_only_at_block_boundaries():
    kv = make_kv(num_blocks=8, block_size=4)
    kv.allocate("a", 3)
    assert len(kv.block_table("a")) == 1
    sizes = []
    for num_tokens in range(4, 14):
        assert kv.can_append("a", num_tokens)
        kv.append("a", num_tokens)
        sizes.append(len(kv.block_table("a")))
    assert sizes == [1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert kv.num_free_blocks == 4
    kv.append("a", 12)  # never shrinks
    assert len(kv.block_table("a")) == 4


def test_can_append_is_false_when_blocks_run_out():
    kv = make_kv(num_blocks=2, block_size=2)
    kv.allocate("a", 2)
    kv.allocate("b", 2)
    assert kv.can_append("a", 2)
    assert not kv.can_append("a", 3)
    kv.free("b")
    assert kv.can_append("a", 4) and not kv.can_append("a", 5)


def test_truncate_frees_blocks_beyond_the_kept_tokens_and_drops_their_hashes():
    kv = make_kv(num_blocks=8, block_size=4)
    tokens = list(range(1, 15))  # 14 tokens: 3 full blocks + 2
    kv.allocate("a", len(tokens))
    kv.cache_full_blocks("a", tokens, len(tokens))
    table = list(kv.block_table("a"))
    assert kv.num_free_blocks == 4

    kv.truncate("a", 8)  # rollback to exactly 2 blocks
    assert kv.block_table("a") == table[:2]
    assert kv.num_free_blocks == 6
    assert all(kv.pool.blocks[i].ref_count == 0 for i in table[2:])
    # The request's own hash chain was cut too: recomputing different tokens publishes them.
    new = tokens[:8] + [50, 51, 52, 53, 54]
    kv.append("a", len(new))
    kv.cache_full_blocks("a", new, len(new))
    assert kv.find_prefix(new + [0]) == kv.block_table("a")[:3]
    kv.free("a")
    assert kv.num_free_blocks == 8


def test_truncate_into_a_cached_block_unpublishes_it():
    """Drafts were computed and published, then rejected: the kept block will be rewritten."""
    kv = make_kv(num_blocks=8, block_size=4)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]  # 7 and 8 are drafts
    kv.allocate("a", 8)
    kv.cache_full_blocks("a", tokens, 8)
    kv.truncate("a", 6)
    assert kv.find_prefix(tokens + [0]) == kv.block_table("a")[:1]
    assert kv.pool.blocks[kv.block_table("a")[1]].block_hash is None

    accepted = tokens[:6] + [9, 9]  # the block now holds 5, 6, 9, 9
    kv.append("a", 8)
    kv.cache_full_blocks("a", accepted, 8)
    assert kv.find_prefix(tokens + [0]) == kv.block_table("a")[:1], "stale K/V served for rejected drafts"
    assert kv.find_prefix(accepted + [0]) == kv.block_table("a")[:2]


def test_free_returns_every_block_and_ignores_unknown_requests():
    kv = make_kv(num_blocks=8, block_size=2)
    run_prompt(kv, "a", [1, 2, 3, 4, 5])
    run_prompt(kv, "b", [1, 2, 3, 4, 6])
    kv.free("a")
    assert not kv.has_request("a")
    kv.free("a")  # twice: no-op
    kv.free("never-added")
    kv.free("b")
    assert kv.num_free_blocks == 8
    assert all(block.ref_count == 0 for block in kv.pool.blocks)


# ----------------------------------------------------------------------------- stateful


@dataclass
class Live:
    token_ids: list[int]
    num_computed_tokens: int


TOKENS = st.integers(0, 2)  # a tiny alphabet, so prefixes repeat


class KVCacheMachine(RuleBasedStateMachine):
    """Random request lifecycles against a model of which tokens each request has computed."""

    @initialize(num_blocks=st.integers(8, 32), block_size=st.integers(1, 8), caching=st.booleans())
    def setup(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.kv = make_kv(num_blocks, block_size, caching)
        self.pool = self.kv.pool
        self.bs = block_size
        self.live: dict[str, Live] = {}
        self.content: dict[int, tuple[int, ...]] = {}  # the full prefix a full, computed block ends
        self.next_id = 0

    # ---- rules

    @rule(prompt=st.lists(TOKENS, min_size=1, max_size=24))
    def add_request(self, prompt: list[int]) -> None:
        prefix = self.kv.find_prefix(prompt)
        self.check_prefix(prompt, prefix)
        if not self.kv.can_allocate(len(prompt), prefix):
            revived = sum(self.pool.blocks[b].ref_count == 0 for b in prefix)
            assert self.kv.num_blocks_for(len(prompt)) - len(prefix) + revived > self.kv.num_free_blocks
            return
        request_id = f"r{self.next_id}"
        self.next_id += 1
        self.kv.allocate(request_id, len(prompt), prefix)
        assert self.kv.block_table(request_id)[: len(prefix)] == prefix
        self.live[request_id] = Live(list(prompt), len(prefix) * self.bs)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), new=st.lists(TOKENS, min_size=1, max_size=6))
    def append_tokens(self, data: st.DataObject, new: list[int]) -> None:
        request_id, live = self.pick(data)
        total = len(live.token_ids) + len(new)
        table = self.kv.block_table(request_id)
        if not self.kv.can_append(request_id, total):
            assert self.kv.num_blocks_for(total) - len(table) > self.kv.num_free_blocks
            return
        self.kv.append(request_id, total)
        live.token_ids += new

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def compute_and_cache(self, data: st.DataObject) -> None:
        request_id, live = self.pick(data)
        n = data.draw(st.integers(live.num_computed_tokens, len(live.token_ids)), label="computed")
        self.compute(request_id, live, n)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), drafts=st.lists(TOKENS, min_size=1, max_size=6))
    def speculate(self, data: st.DataObject, drafts: list[int]) -> None:
        """Drafts are computed and published with the step, then the rejected ones roll back."""
        request_id, live = self.pick(data)
        verified = len(live.token_ids)
        if not self.kv.can_append(request_id, verified + len(drafts)):
            return
        self.kv.append(request_id, verified + len(drafts))
        live.token_ids += drafts
        self.compute(request_id, live, len(live.token_ids))
        keep = verified + data.draw(st.integers(0, len(drafts)), label="accepted")
        self.truncate(request_id, live, keep)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def truncate_uncomputed(self, data: st.DataObject) -> None:
        request_id, live = self.pick(data)
        keep = data.draw(st.integers(live.num_computed_tokens, len(live.token_ids)), label="keep")
        self.truncate(request_id, live, keep)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        request_id, _ = self.pick(data)
        self.kv.free(request_id)
        del self.live[request_id]

    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        """Abort any id: live, already finished, or never seen; freeing is idempotent."""
        request_id = data.draw(st.sampled_from(sorted(self.live) + ["r0", "unknown"]), label="abort")
        self.kv.free(request_id)
        self.live.pop(request_id, None)
        assert not self.kv.has_request(request_id)

    # ---- helpers

    def pick(self, data: st.DataObject) -> tuple[str, Live]:
        request_id = data.draw(st.sampled_from(sorted(self.live)), label="request")
        return request_id, self.live[request_id]

    def compute(self, request_id: str, live: Live, n: int) -> None:
        live.num_computed_tokens = n
        self.kv.cache_full_blocks(request_id, live.token_ids, n)
        for i, block_id in enumerate(self.kv.block_table(request_id)[: n // self.bs]):
            self.content[block_id] = tuple(live.token_ids[: (i + 1) * self.bs])

    def truncate(self, request_id: str, live: Live, keep: int) -> None:
        self.kv.truncate(request_id, keep)
        del live.token_ids[keep:]
        live.num_computed_tokens = min(live.num_computed_tokens, keep)
        if keep % self.bs:  # the partly kept block's tail will be rewritten
            self.content.pop(self.kv.block_table(request_id)[keep // self.bs], None)

    def check_prefix(self, prompt: list[int], prefix: list[int]) -> None:
        """A hit holds exactly the prompt's tokens, is maximal, and leaves a token to compute."""
        assert len(prefix) * self.bs <= len(prompt) - 1
        if not self.pool.enable_prefix_caching:
            assert prefix == []
            return
        for i, block_id in enumerate(prefix):
            assert self.content.get(block_id) == tuple(prompt[: (i + 1) * self.bs]), "hit on wrong content"
        if (len(prefix) + 1) * self.bs <= len(prompt) - 1:
            assert self.pool.lookup(chain_hash(prompt, len(prefix) + 1, self.bs)) is None, "hit not maximal"

    # ---- invariants

    @invariant()
    def ref_counts_match_tables(self) -> None:
        if not hasattr(self, "kv"):
            return
        holders = Counter(b for rid in self.live for b in self.kv.block_table(rid))
        for block in self.pool.blocks:
            assert block.ref_count == holders[block.block_id], f"block {block.block_id}"
        used = set(holders)
        free = {b.block_id for b in self.pool.blocks if b.ref_count == 0}
        assert free == set(range(self.pool.num_blocks)) - used
        assert self.kv.num_free_blocks + len(used) == self.pool.num_blocks
        for request_id, live in self.live.items():
            table = self.kv.block_table(request_id)
            assert len(table) == self.kv.num_blocks_for(len(live.token_ids))
            assert len(set(table)) == len(table)

    @invariant()
    def hashes_name_their_blocks_and_contents(self) -> None:
        if not hasattr(self, "kv"):
            return
        for block_hash, block_id in self.pool._cached.items():
            assert self.pool.blocks[block_id].block_hash == block_hash
        for block in self.pool.blocks:
            if block.block_hash is not None:
                assert self.pool.lookup(block.block_hash) == block.block_id
        for request_id, live in self.live.items():
            for i, block_id in enumerate(self.kv.block_table(request_id)):
                block_hash = self.pool.blocks[block_id].block_hash
                if block_hash is not None:
                    assert (i + 1) * self.bs <= live.num_computed_tokens, f"block {block_id} is cached but stale"
                    assert block_hash == chain_hash(live.token_ids, i + 1, self.bs)

    def teardown(self) -> None:
        if not hasattr(self, "kv"):
            return
        for request_id in list(self.live):
            self.kv.free(request_id)
        assert self.kv.num_free_blocks == self.pool.num_blocks, "blocks leaked"
        assert all(block.ref_count == 0 for block in self.pool.blocks)


TestKVCacheMachine = KVCacheMachine.TestCase
TestKVCacheMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
