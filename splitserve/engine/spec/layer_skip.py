"""Self-speculation by layer skipping (SWIFT, Kangaroo, LayerSkip): the target model with some
layers left out drafts greedily. It needs no extra weights and no cache of its own: it reads
the target's K/V of the kept layers and writes its draft positions there, which the
verification pass then overwrites with the full model's values."""

from __future__ import annotations

from collections.abc import Sequence

from splitserve.engine.runner import BatchItem, ModelRunner
from splitserve.engine.spec.proposer import DraftRequest


def default_skip_layers(num_layers: int) -> tuple[int, ...]:
    """Skip every other layer of the middle half: early and late layers matter most."""
    return tuple(range(num_layers // 4, num_layers - num_layers // 4, 2))


class LayerSkipProposer:
    name = "layer_skip"
    is_deterministic = True

    def __init__(self, runner: ModelRunner, skip_layers: Sequence[int] | None = None):
        num_layers = runner.model.config.num_layers
        skip = default_skip_layers(num_layers) if skip_layers is None else tuple(skip_layers)
        bad = [i for i in skip if not 0 <= i < num_layers]
        if bad or len(set(skip)) >= num_layers:
            raise ValueError(f"skip_layers must name some (not all) of layers 0..{num_layers - 1}, got {list(skip)}")
        self.runner = runner
        self.skip_layers = skip
        self.layer_ids = [i for i in range(num_layers) if i not in set(skip)]

    def propose(self, batch: Sequence[DraftRequest]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in batch]
        active = [i for i, r in enumerate(batch) if r.num_draft_tokens > 0]
        step = 0
        while active:
            items = [
                BatchItem(
                    token_ids=[drafts[i][-1] if drafts[i] else batch[i].token_ids[-1]],
                    start=batch[i].num_computed_tokens + step,
                    block_table=batch[i].block_table,
                    num_logits=1,
                )
                for i in active
            ]
            next_tokens = self.runner.execute(items, self.layer_ids).argmax(dim=-1).tolist()
            for i, token in zip(active, next_tokens):
                drafts[i].append(token)
            active = [i for i in active if len(drafts[i]) < batch[i].num_draft_tokens]
            step += 1
        return drafts

    def on_verified(self, request_id: str, num_valid_tokens: int) -> None:
        pass

    def free(self, request_id: str) -> None:
        pass
