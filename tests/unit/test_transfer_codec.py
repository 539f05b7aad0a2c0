"""Wire codecs: raw is bitwise, fp16 halves and int8 quarters the bytes within their error bounds."""

from __future__ import annotations

import pytest
import torch

from splitserve.transfer import CODECS, get_codec

SHAPE = (3, 2, 17, 4, 64)  # layers, k/v, tokens, kv heads, head dim


def kv(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * torch.logspace(-2, 2, SHAPE[2]).view(1, 1, -1, 1, 1)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_raw_is_bitwise_and_zero_copy(dtype: torch.dtype):
    codec, x = get_codec("raw"), kv(dtype)
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.numel() == codec.nbytes(SHAPE, dtype) == x.numel() * x.itemsize
    assert payload.data_ptr() == x.data_ptr()
    out = codec.decode(payload.clone(), SHAPE, dtype)
    assert out.dtype == dtype and torch.equal(out.view(torch.uint8), x.view(torch.uint8))


def test_raw_copies_a_non_contiguous_tensor():
    x = kv().transpose(3, 4).contiguous().transpose(3, 4)
    assert not x.is_contiguous()
    codec = get_codec("raw")
    assert torch.equal(codec.decode(codec.encode(x), SHAPE, torch.float32), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp16_halves_fp32_bytes_within_half_precision(dtype: torch.dtype):
    codec, x = get_codec("fp16"), kv(dtype)
    payload = codec.encode(x)
    assert payload.numel() == codec.nbytes(SHAPE, dtype) == x.numel() * 2
    out = codec.decode(payload, SHAPE, dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), x.float(), rtol=2**-10, atol=1e-6)


def test_fp16_clamps_instead_of_overflowing():
    x = torch.full(SHAPE, 1e6, dtype=torch.bfloat16)
    out = get_codec("fp16").decode(get_codec("fp16").encode(x), SHAPE, torch.bfloat16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_quarters_fp32_bytes_within_its_scale(dtype: torch.dtype):
    codec, x = get_codec("int8"), kv(dtype)
    payload = codec.encode(x)
    numel = x.numel()
    assert payload.numel() == codec.nbytes(SHAPE, dtype) == numel + numel // SHAPE[-1] * 4
    assert payload.numel() <= 0.27 * numel * 4  # a quarter of fp32 plus 4 bytes of scale per 64 values
    out = codec.decode(payload, SHAPE, dtype)
    assert out.dtype == dtype
    # Per head vector: |error| <= absmax / 254 (rounding), plus the cache dtype's own rounding.
    bound = x.float().abs().amax(-1, keepdim=True) / 254 * 1.01 + x.float().abs() * 2**-7
    assert ((out.float() - x.float()).abs() <= bound).all()


def test_int8_zero_vectors_and_odd_sizes():
    shape = (1, 2, 3, 1, 5)  # element count not a multiple of 4: scales still decode aligned
    x = torch.randn(shape)
    x[0, 0, 1] = 0
    codec = get_codec("int8")
    out = codec.decode(codec.encode(x).clone(), shape, torch.float32)
    assert torch.equal(out[0, 0, 1], torch.zeros(1, 5))
    torch.testing.assert_close(out, x, atol=x.abs().max().item() / 200, rtol=0)


def test_registry_lists_the_codecs_and_refuses_unknown_names():
    assert set(CODECS) == {"raw", "fp16", "int8"}
    with pytest.raises(ValueError, match="unknown KV codec 'zstd'"):
        get_codec("zstd")


def test_the_configuration_lists_exactly_the_codecs_there_are():
    from splitserve.config import KV_CODECS

    assert sorted(KV_CODECS) == sorted(CODECS)
