"""Wire codecs for KV chunks: how a chunk's tensor becomes bytes and back (CacheGen's idea).

Every codec turns a ``(layers, 2, tokens, kv_heads, head_dim)`` tensor into one flat uint8
payload and back into the cache's dtype; the manifest's shape and dtype are all a decoder
needs. ``raw`` is bitwise (and zero-copy for a contiguous tensor), ``fp16`` halves fp32 bytes,
``int8`` keeps an fp32 absmax scale per (layer, k/v, token, head) followed by one int8 per
element: a quarter of fp32's bytes plus 4/head_dim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from math import prod

import torch

_FP16_MAX = torch.finfo(torch.float16).max


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 tensor (a view when already contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


class Codec(ABC):
    name: str

    @abstractmethod
    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        """The chunk as a flat uint8 payload (may share memory with ``kv``: don't modify it)."""

    @abstractmethod
    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The chunk back from ``payload``, in ``dtype``, on the payload's device."""

    @abstractmethod
    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Payload size of a chunk of this shape and dtype (so a receiver can size its buffer)."""


class RawCodec(Codec):
    name = "raw"

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        return as_bytes(kv)

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return payload.view(dtype).view(shape)

    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return prod(shape) * dtype.itemsize


class Fp16Codec(Codec):
    name = "fp16"

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        if kv.dtype == torch.float16:
            return as_bytes(kv)
        # Clamped: a value beyond fp16's range arrives as the largest finite fp16, not inf
        # (in place on the half-size copy: no full-size temporary).
        return as_bytes(kv.to(torch.float16).clamp_(-_FP16_MAX, _FP16_MAX))

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return payload.view(torch.float16).view(shape).to(dtype)

    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return prod(shape) * 2


class Int8Codec(Codec):
    """Symmetric int8 with one absmax scale per head vector: error <= scale / 2 = absmax / 254."""

    name = "int8"

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        x = kv.float()
        # max |x| from max and min: no full-size |x| temporary.
        absmax = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
        scale = absmax.clamp_min_(torch.finfo(torch.float32).tiny).div_(127.0)
        q = torch.div(x, scale).round_().clamp_(-127, 127).to(torch.int8)
        # Scales first: their fp32 view then starts 4-byte aligned whatever the element count.
        return torch.cat([as_bytes(scale), as_bytes(q)])

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        num_scale_bytes = prod(shape[:-1]) * 4
        scale = payload[:num_scale_bytes].view(torch.float32).view(*shape[:-1], 1)
        q = payload[num_scale_bytes:].view(torch.int8).view(shape)
        return q.float().mul_(scale).to(dtype)  # twice as fast here as the promoting torch.mul(q, scale)

    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return prod(shape) + prod(shape[:-1]) * 4


CODECS: dict[str, Codec] = {c.name: c for c in (RawCodec(), Fp16Codec(), Int8Codec())}


def get_codec(name: str) -> Codec:
    """The codec registered under ``name``; ValueError for an unknown one."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown KV codec {name!r}; known: {', '.join(sorted(CODECS))}") from None
