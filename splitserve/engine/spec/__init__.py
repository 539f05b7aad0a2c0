"""Speculative decoding: proposers behind one interface, and the lossless verifier."""

from __future__ import annotations

from collections.abc import Callable

from splitserve.config import SpeculativeConfig
from splitserve.engine.model import Model
from splitserve.engine.runner import ModelRunner
from splitserve.engine.spec.draft import DraftModelProposer
from splitserve.engine.spec.layer_skip import LayerSkipProposer
from splitserve.engine.spec.ngram import NgramProposer
from splitserve.engine.spec.proposer import DraftRequest, Proposer

__all__ = ["DraftRequest", "Proposer", "make_proposer"]


def make_proposer(
    config: SpeculativeConfig, runner: ModelRunner, num_blocks: int, block_size: int, draft_model: Callable[[], Model]
) -> Proposer:
    """Build the configured proposer. ``draft_model`` loads the draft (only "draft" calls it)."""
    if config.proposer == "ngram":
        return NgramProposer(config.ngram_min, config.ngram_max)
    if config.proposer == "layer_skip":
        return LayerSkipProposer(runner, config.skip_layers)
    assert config.proposer == "draft", f"unknown proposer {config.proposer!r}"
    return DraftModelProposer(draft_model(), runner.model.config.vocab_size, num_blocks, block_size)
