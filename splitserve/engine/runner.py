"""ModelRunner: a scheduled batch -> flat tensors and attention metadata -> model -> logits.

It owns the KV cache tensor ``[num_layers, 2, num_blocks * block_size, kv_heads, head_dim]``
(a block is ``block_size`` consecutive slots). Requests with few new tokens (decode,
speculative verification) attend as one padded batch; longer prefill chunks are packed end
to end without padding under a block-diagonal causal mask. Short requests come first in
the flat rows, so a step with only one kind needs no scatter.

On CPU, torch runs the projections through oneDNN, which keeps a compiled primitive per shape
in a cache of 1024 by default; continuous batching gives each step its own token count, so
that cache fills over tens of minutes of serving with ~0.9 MiB per entry (measured on the
engine alone under continuous arrivals: +170 MiB in a minute, none with one fixed prompt
length). Loading a model (and building a runner) caps it at
``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` (128: the same step speed, ~0.1 GiB at most), unless the
environment already sets it; oneDNN reads it when it first builds a primitive, so a process
that ran oneDNN before keeps its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from splitserve.config import ModelConfig
from splitserve.engine.model import EAGER_STAGES, AttentionMetadata, LayerStages, Model, PackedGroup, ShortGroup

# A request with at most this many new tokens joins the padded group.
MAX_SHORT_QUERY = 16
ONEDNN_PRIMITIVE_CACHE_CAPACITY = 128


def limit_onednn_cache() -> None:
    """Cap oneDNN's primitive cache (module docstring) unless the environment sets it already."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE_CAPACITY))


@dataclass
class BatchItem:
    """One request's slice of a step: tokens [start, start + len(token_ids)) of its sequence.

    num_logits: how many of the slice's last rows need logits (0 for a prefill chunk that does
    not finish the prompt, 1 to sample the next token, 1 + k to verify k draft tokens).
    """

    token_ids: Sequence[int]
    start: int
    block_table: Sequence[int]
    num_logits: int


class ModelRunner:
    def __init__(self, model: Model, num_blocks: int, block_size: int):
        limit_onednn_cache()
        c: ModelConfig = model.config
        self.model = model
        # The layers' halves around attention; compiled.compile_runner swaps in compiled ones.
        self.stages: LayerStages = EAGER_STAGES
        self.block_size = block_size
        self.num_groups = c.num_heads // c.num_kv_heads
        self.device = model.device
        self.kv_cache = torch.zeros(
            c.num_layers, 2, num_blocks * block_size, c.num_kv_heads, c.head_dim,
            dtype=model.dtype, device=model.device,
        )

    def execute(
        self,
        items: Sequence[BatchItem],
        layer_ids: Sequence[int] | None = None,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Run one step; return fp32 logits of each item's last ``num_logits`` rows, in item order.

        on_layer(i) is called as soon as layer i's K/V for this step are in ``kv_cache``.
        """
        order = sorted(range(len(items)), key=lambda i: len(items[i].token_ids) > MAX_SHORT_QUERY)
        ordered = [items[i] for i in order]
        input_ids, positions, slot_mapping = self._flat_inputs(ordered)
        lengths = [len(it.token_ids) for it in ordered]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        num_short = sum(1 for n in lengths if n <= MAX_SHORT_QUERY)
        attn = AttentionMetadata(
            slot_mapping=self._tensor(slot_mapping),
            block_size=self.block_size,
            short=self._short_group(ordered[:num_short], offsets) if num_short else None,
            packed=self._packed_group(ordered[num_short:], offsets[num_short:]) if num_short < len(ordered) else None,
        )
        ends = {order[j]: int(offsets[j + 1]) for j in range(len(ordered))}
        logit_rows = [row for i, it in enumerate(items) for row in range(ends[i] - it.num_logits, ends[i])]
        return self.model.forward(
            self._tensor(input_ids), self._tensor(positions), self.kv_cache, attn,
            self._tensor(np.asarray(logit_rows, dtype=np.int64)), layer_ids, on_layer, self.stages,
        )

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def slots(self, block_table: Sequence[int], start: int, stop: int) -> np.ndarray:
        """Cache slots of positions [start, stop) of a request."""
        positions = np.arange(start, stop)
        table = np.asarray(block_table, dtype=np.int64)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def _flat_inputs(self, items: Sequence[BatchItem]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        input_ids = np.concatenate([np.asarray(it.token_ids, dtype=np.int64) for it in items])
        positions = np.concatenate([np.arange(it.start, it.start + len(it.token_ids)) for it in items])
        slots = np.concatenate([self.slots(it.block_table, it.start, it.start + len(it.token_ids)) for it in items])
        return input_ids, positions, slots

    def _short_group(self, items: Sequence[BatchItem], offsets: np.ndarray) -> ShortGroup:
        batch = len(items)
        lengths = np.array([len(it.token_ids) for it in items])
        starts = np.array([it.start for it in items])
        num_q = int(lengths.max())
        num_blocks = -(-int((starts + lengths).max()) // self.block_size)
        q_idx = np.arange(num_q)
        query_mask = q_idx[None, :] < lengths[:, None]
        # Padding queries repeat the request's last real query (a non-empty mask row, no NaN).
        q_clamped = np.minimum(q_idx[None, :], lengths[:, None] - 1)
        rows = offsets[:batch, None] + q_clamped
        blocks = np.zeros((batch, num_blocks), dtype=np.int64)
        for b, it in enumerate(items):
            used = -(-(it.start + len(it.token_ids)) // self.block_size)
            blocks[b, :used] = it.block_table[:used]
        key_pos = np.arange(num_blocks * self.block_size)
        mask = key_pos[None, None, :] <= (starts[:, None] + q_clamped)[:, :, None]
        mask = np.tile(mask[:, None], (1, 1, self.num_groups, 1))  # rows ordered (group, query)
        return ShortGroup(
            rows=self._tensor(rows),
            valid_rows=self._tensor(rows[query_mask]),
            query_mask=self._tensor(query_mask),
            blocks=self._tensor(blocks.reshape(-1)),
            mask=self._tensor(mask),
        )

    def _packed_group(self, items: Sequence[BatchItem], offsets: np.ndarray) -> PackedGroup:
        lengths = [len(it.token_ids) for it in items]
        rows = np.arange(offsets[0], offsets[0] + sum(lengths))
        ends = [it.start + n for it, n in zip(items, lengths)]
        used = [-(-end // self.block_size) for end in ends]
        blocks = np.concatenate([np.asarray(it.block_table[:n], dtype=np.int64) for it, n in zip(items, used)])
        row_request = np.repeat(np.arange(len(items)), lengths)
        row_pos = np.concatenate([np.arange(it.start, end) for it, end in zip(items, ends)])
        key_request = np.repeat(np.arange(len(items)), [n * self.block_size for n in used])
        key_pos = np.concatenate([np.arange(n * self.block_size) for n in used])
        mask = (row_request[:, None] == key_request[None, :]) & (key_pos[None, :] <= row_pos[:, None])
        mask = np.tile(mask, (self.num_groups, 1))[None, None]
        return PackedGroup(rows=self._tensor(rows), blocks=self._tensor(blocks), mask=self._tensor(mask))
