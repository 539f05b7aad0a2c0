"""gather_kv / scatter_kv: exactly the chunk's slots, nothing else, idempotent; bad input refused."""

from __future__ import annotations

import pytest
import torch

from splitserve.transfer import KVManifest, covering_blocks, gather_chunk, gather_kv, scatter_chunk, scatter_kv

LAYERS, HEADS, DIM, BLOCK, BLOCKS = 5, 2, 8, 4, 12


def cache(fill: float | None = None) -> torch.Tensor:
    if fill is not None:
        return torch.full((LAYERS, 2, BLOCKS * BLOCK, HEADS, DIM), fill)
    return torch.randn(LAYERS, 2, BLOCKS * BLOCK, HEADS, DIM, generator=torch.Generator().manual_seed(1))


def test_gather_reads_each_token_from_its_block():
    src = cache()
    table = [9, 2, 5, 0]
    chunk = gather_kv(src, (1, 4), covering_blocks(table, 3, 13, BLOCK), (3, 13), BLOCK)
    assert chunk.shape == (3, 2, 10, HEADS, DIM) and chunk.is_contiguous()
    for i, t in enumerate(range(3, 13)):
        slot = table[t // BLOCK] * BLOCK + t % BLOCK
        assert torch.equal(chunk[:, :, i], src[1:4, :, slot])


def test_scatter_writes_exactly_the_chunk_slots_and_is_idempotent():
    dst, chunk = cache(fill=-7.0), torch.randn(2, 2, 6, HEADS, DIM)
    blocks = (11, 4)  # tokens 6..11: the last two of block 11, then four of block 4
    scatter_kv(dst, (2, 4), blocks, (6, 12), BLOCK, chunk)
    once = dst.clone()
    scatter_kv(dst, (2, 4), blocks, (6, 12), BLOCK, chunk)
    assert torch.equal(dst, once)
    slots = [11 * BLOCK + 2, 11 * BLOCK + 3, 16, 17, 18, 19]
    assert torch.equal(dst[2:4][:, :, slots], chunk)
    untouched = torch.ones_like(dst, dtype=torch.bool)
    untouched[2:4, :, slots] = False
    assert (dst[untouched] == -7.0).all()


def test_gather_then_scatter_through_a_manifest_moves_kv_between_block_layouts():
    src, dst = cache(), cache(fill=0.0)
    m = KVManifest("r", "p", "d", 0, 0, LAYERS, 1, 9, BLOCK, (3, 7, 10), HEADS, DIM)
    scatter_chunk(dst, m, gather_chunk(src, m, src_block_ids=(0, 1, 2)))
    assert torch.equal(dst[:, :, 3 * BLOCK + 1 : 3 * BLOCK + 4], src[:, :, 1:4])
    assert torch.equal(dst[:, :, 7 * BLOCK : 8 * BLOCK], src[:, :, 4:8])
    assert torch.equal(dst[:, :, 10 * BLOCK], src[:, :, 8])


def test_scatter_casts_to_the_cache_dtype():
    dst = cache(fill=0.0).to(torch.bfloat16)
    chunk = torch.randn(1, 2, 4, HEADS, DIM)
    scatter_kv(dst, (0, 1), (2,), (0, 4), BLOCK, chunk)
    assert torch.equal(dst[0, :, 8:12], chunk[0].to(torch.bfloat16))


@pytest.mark.parametrize(
    "layers, blocks, tokens, message",
    [
        ((0, 6), (1,), (0, 4), "layer range"),
        ((3, 3), (1,), (0, 4), "layer range"),
        ((0, 1), (1, 2), (0, 4), "span 1 blocks"),
        ((0, 1), (BLOCKS,), (0, 4), "outside a cache"),
        ((0, 1), (-1,), (0, 4), "outside a cache"),
        ((0, 1), (1,), (4, 4), "token range"),
    ],
)
def test_bad_ranges_raise_value_error(layers, blocks, tokens, message):
    with pytest.raises(ValueError, match=message):
        gather_kv(cache(), layers, blocks, tokens, BLOCK)


def test_scatter_refuses_a_chunk_of_the_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        scatter_kv(cache(), (0, 2), (1,), (0, 4), BLOCK, torch.zeros(2, 2, 3, HEADS, DIM))


def test_covering_blocks_needs_a_long_enough_table():
    assert covering_blocks([5, 6, 7], 4, 9, BLOCK) == (6, 7)
    with pytest.raises(ValueError, match="block table"):
        covering_blocks([5, 6], 4, 9, BLOCK)
