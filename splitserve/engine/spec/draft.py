"""Draft-model proposer: a smaller model with the same tokenizer drafts greedily.

It keeps its own paged KV cache, in step with the target: each proposal first feeds the
draft the tokens it has not seen yet (the whole prompt the first time, afterwards the tokens
the target accepted), then drafts k tokens one forward at a time, batched over requests.
After verification its cache is rolled back to the tokens the target kept.
"""

from __future__ import annotations

from collections.abc import Sequence

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.kv_cache import KVCacheManager
from splitserve.engine.model import Model
from splitserve.engine.runner import BatchItem, ModelRunner
from splitserve.engine.spec.proposer import DraftRequest


class DraftModelProposer:
    name = "draft"
    is_deterministic = True

    def __init__(self, model: Model, target_vocab_size: int, num_blocks: int, block_size: int):
        if model.config.vocab_size != target_vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({model.config.vocab_size} tokens) differs from the "
                f"target's ({target_vocab_size}); a draft model must share the target's tokenizer"
            )
        self.kv_cache = KVCacheManager(BlockPool(num_blocks, block_size, enable_prefix_caching=False))
        self.runner = ModelRunner(model, num_blocks, block_size)
        self._num_computed: dict[str, int] = {}  # tokens whose K/V the draft cache holds

    def propose(self, batch: Sequence[DraftRequest]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in batch]
        active = [i for i, r in enumerate(batch) if r.num_draft_tokens > 0 and self._reserve(r)]
        step = 0
        while active:
            items = [self._item(batch[i], drafts[i], step) for i in active]
            next_tokens = self.runner.execute(items).argmax(dim=-1).tolist()
            for i, item, token in zip(active, items, next_tokens):
                drafts[i].append(token)
                self._num_computed[batch[i].request_id] = item.start + len(item.token_ids)
            active = [i for i in active if len(drafts[i]) < batch[i].num_draft_tokens]
            step += 1
        return drafts

    def _reserve(self, request: DraftRequest) -> bool:
        """Room in the draft cache for every token up to the last draft's input; False: skip."""
        needed = request.num_computed_tokens + request.num_draft_tokens
        rid = request.request_id
        if self.kv_cache.has_request(rid):
            if not self.kv_cache.can_append(rid, needed):
                return False
            self.kv_cache.append(rid, needed)
            return True
        if not self.kv_cache.can_allocate(needed):
            return False
        self.kv_cache.allocate(rid, needed)
        self._num_computed[rid] = 0
        return True

    def _item(self, request: DraftRequest, drafts: list[int], step: int) -> BatchItem:
        table = self.kv_cache.block_table(request.request_id)
        if step == 0:  # catch up on everything the draft has not seen, last token included
            start = self._num_computed[request.request_id]
            return BatchItem(request.token_ids[start:], start, table, num_logits=1)
        return BatchItem([drafts[-1]], request.num_computed_tokens + step, table, num_logits=1)

    def on_verified(self, request_id: str, num_valid_tokens: int) -> None:
        if request_id in self._num_computed:
            kept = min(self._num_computed[request_id], num_valid_tokens)
            self._num_computed[request_id] = kept
            self.kv_cache.truncate(request_id, kept)

    def free(self, request_id: str) -> None:
        self._num_computed.pop(request_id, None)
        self.kv_cache.free(request_id)
