"""Reading a chunk out of a paged KV cache and writing one in: pure functions over tensors.

The cache is ``[num_layers, 2, num_blocks * block_size, num_kv_heads, head_dim]`` (the
runner's ``kv_cache``); block ``b`` holds slots ``b * block_size .. (b + 1) * block_size - 1``.
A chunk covers layers ``[layer_start, layer_end)`` and tokens ``[token_start, token_end)`` of one
request, whose tokens sit in ``block_ids`` — the blocks covering that token range, in order,
starting with the block of ``token_start`` (``covering_blocks`` cuts them from a block table).
The prefill worker gathers with its own block table, the decode worker scatters with the
blocks it reserved; writing the same chunk twice leaves the cache as writing it once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitserve.transfer.manifest import KVManifest, num_covering_blocks


def covering_blocks(block_table: Sequence[int], token_start: int, token_end: int, block_size: int) -> tuple[int, ...]:
    """The blocks of a request's block table that hold tokens [token_start, token_end)."""
    first, end = token_start // block_size, -(-token_end // block_size)
    if end > len(block_table):
        raise ValueError(f"tokens up to {token_end} need {end} blocks, the block table has {len(block_table)}")
    return tuple(block_table[first:end])


def chunk_slots(
    block_ids: Sequence[int], token_range: tuple[int, int], block_size: int, num_slots: int, device: torch.device
) -> torch.Tensor:
    """Cache slots of tokens ``token_range`` (int64, one per token), checked against the cache."""
    token_start, token_end = token_range
    if not 0 <= token_start < token_end:
        raise ValueError(f"token range [{token_start}, {token_end}) must be non-empty and non-negative")
    expected = num_covering_blocks(token_start, token_end, block_size)
    if len(block_ids) != expected:
        raise ValueError(f"tokens [{token_start}, {token_end}) span {expected} blocks, got {len(block_ids)} block ids")
    blocks = torch.tensor(block_ids, dtype=torch.int64)
    if (blocks < 0).any() or ((blocks + 1) * block_size > num_slots).any():
        raise ValueError(f"block ids {list(block_ids)} fall outside a cache of {num_slots // block_size} blocks")
    positions = torch.arange(token_start, token_end)
    slots = blocks[positions // block_size - token_start // block_size] * block_size + positions % block_size
    return slots.to(device)


def _layers(kv_cache: torch.Tensor, layer_range: tuple[int, int]) -> torch.Tensor:
    layer_start, layer_end = layer_range
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(f"expected a [layers, 2, slots, kv_heads, head_dim] cache, got shape {tuple(kv_cache.shape)}")
    if not 0 <= layer_start < layer_end <= kv_cache.shape[0]:
        raise ValueError(
            f"layer range [{layer_start}, {layer_end}) is not within the cache's {kv_cache.shape[0]} layers"
        )
    return kv_cache[layer_start:layer_end]


def gather_kv(
    kv_cache: torch.Tensor,
    layer_range: tuple[int, int],
    block_ids: Sequence[int],
    token_range: tuple[int, int],
    block_size: int,
) -> torch.Tensor:
    """A contiguous copy ``[layers, 2, tokens, kv_heads, head_dim]`` of the chunk's slots."""
    layers = _layers(kv_cache, layer_range)
    slots = chunk_slots(block_ids, token_range, block_size, kv_cache.shape[2], kv_cache.device)
    return layers.index_select(2, slots)


def scatter_kv(
    kv_cache: torch.Tensor,
    layer_range: tuple[int, int],
    block_ids: Sequence[int],
    token_range: tuple[int, int],
    block_size: int,
    kv: torch.Tensor,
) -> None:
    """Write ``kv`` into exactly the chunk's slots of ``kv_cache`` (in place; idempotent)."""
    layers = _layers(kv_cache, layer_range)
    slots = chunk_slots(block_ids, token_range, block_size, kv_cache.shape[2], kv_cache.device)
    expected = (layers.shape[0], 2, len(slots), *kv_cache.shape[3:])
    if tuple(kv.shape) != expected:
        raise ValueError(f"chunk tensor has shape {tuple(kv.shape)}, its slots need {expected}")
    layers.index_copy_(2, slots, kv.to(device=kv_cache.device, dtype=kv_cache.dtype))


def gather_chunk(kv_cache: torch.Tensor, manifest: KVManifest, src_block_ids: Sequence[int]) -> torch.Tensor:
    """The chunk ``manifest`` describes, read from the sender's cache through its own blocks."""
    return gather_kv(
        kv_cache, (manifest.layer_start, manifest.layer_end), src_block_ids,
        (manifest.token_start, manifest.token_end), manifest.block_size,
    )


def scatter_chunk(kv_cache: torch.Tensor, manifest: KVManifest, kv: torch.Tensor) -> None:
    """Write a received chunk into the blocks its manifest names (what a decode worker's sink does)."""
    scatter_kv(
        kv_cache, (manifest.layer_start, manifest.layer_end), manifest.dst_block_ids,
        (manifest.token_start, manifest.token_end), manifest.block_size, kv,
    )
