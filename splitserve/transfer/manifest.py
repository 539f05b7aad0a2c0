"""KVManifest: what one KV chunk is and where it goes, checked when it is built.

A chunk is the K and V of a layer range and a token range of one request, headed for blocks a
decode worker reserved. The prefill side builds the manifest (without a checksum: the sender
adds it, and with a deployment key the authentication tag over the rest, ``KVAuth``), the
transfer backends carry it next to the encoded bytes, and the decode side's sink
reads it to know which cache slots to write. ``dst_block_ids`` are the destination blocks that
hold the chunk's tokens, in order, starting with the block of ``token_start``: token ``t`` lands
in slot ``dst_block_ids[t // block_size - token_start // block_size] * block_size + t % block_size``.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, replace

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_VERSION = 2  # 2: the authentication tag after the strings
# version, chunk_index, layer_start, layer_end, token_start, token_end, block_size,
# num_kv_heads, head_dim, has_checksum, checksum, number of block ids
_FIXED = struct.Struct("<BIHHIIHHHBII")
_MAX_U16, _MAX_U32 = (1 << 16) - 1, (1 << 32) - 1


def num_covering_blocks(token_start: int, token_end: int, block_size: int) -> int:
    """How many blocks hold tokens [token_start, token_end)."""
    return -(-token_end // block_size) - token_start // block_size


@dataclass(frozen=True)
class KVManifest:
    """One chunk of one request's KV cache: source, destination, ranges, encoding, checksum.

    ``checksum`` is the CRC-32 of the encoded payload; None until the sender computes it.
    ``auth_tag``: the sender's tag over the rest of the manifest (``KVAuth.tag_manifest`` of
    ``unsigned().to_bytes()``), None when the deployment has no KV auth key.
    The chunk's tensor has shape ``(layer_end - layer_start, 2, token_end - token_start,
    num_kv_heads, head_dim)`` (see ``shape``) and the cache's ``dtype``.
    """

    request_id: str
    src_worker: str
    dst_worker: str
    chunk_index: int
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int
    block_size: int
    dst_block_ids: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    codec: str = "raw"
    checksum: int | None = None
    auth_tag: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dst_block_ids", tuple(int(b) for b in self.dst_block_ids))
        for name in ("request_id", "src_worker", "dst_worker"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value.encode()) > _MAX_U16:
                raise ValueError(f"{name} must be a non-empty string of at most {_MAX_U16} bytes, got {value!r}")
        self._check_ranges()
        self._check_blocks()
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        from splitserve.transfer.codec import CODECS  # codec imports this module

        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {sorted(CODECS)}, got {self.codec!r}")
        if self.checksum is not None and not 0 <= self.checksum <= _MAX_U32:
            raise ValueError(f"checksum must be a CRC-32 in [0, 2**32), got {self.checksum}")
        if self.auth_tag is not None and not (isinstance(self.auth_tag, bytes) and 0 < len(self.auth_tag) <= 255):
            raise ValueError(f"auth_tag must be 1 to 255 bytes, got {self.auth_tag!r}")

    def _check_ranges(self) -> None:
        if not 0 <= self.chunk_index <= _MAX_U32:
            raise ValueError(f"chunk_index must be in [0, 2**32), got {self.chunk_index}")
        if not 0 <= self.layer_start < self.layer_end <= _MAX_U16:
            raise ValueError(f"layer range [{self.layer_start}, {self.layer_end}) must be non-empty and non-negative")
        if not 0 <= self.token_start < self.token_end <= _MAX_U32:
            raise ValueError(f"token range [{self.token_start}, {self.token_end}) must be non-empty and non-negative")
        for name in ("block_size", "num_kv_heads", "head_dim"):
            if not 0 < getattr(self, name) <= _MAX_U16:
                raise ValueError(f"{name} must be in [1, {_MAX_U16}], got {getattr(self, name)}")

    def _check_blocks(self) -> None:
        expected = num_covering_blocks(self.token_start, self.token_end, self.block_size)
        if len(self.dst_block_ids) != expected:
            raise ValueError(
                f"tokens [{self.token_start}, {self.token_end}) with block_size {self.block_size} span "
                f"{expected} blocks, but {len(self.dst_block_ids)} dst_block_ids were given"
            )
        if any(not 0 <= b <= _MAX_U32 for b in self.dst_block_ids):
            raise ValueError(f"dst_block_ids must be in [0, 2**32), got {self.dst_block_ids}")
        if len(set(self.dst_block_ids)) != len(self.dst_block_ids):
            raise ValueError(f"dst_block_ids must be distinct, got {self.dst_block_ids}")

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """Shape of the chunk's KV tensor: (layers, 2, tokens, kv heads, head dim)."""
        return (self.num_layers, 2, self.num_tokens, self.num_kv_heads, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def key(self) -> tuple[str, int]:
        """Identifies the chunk within the transfer: the same key twice is the same chunk."""
        return (self.request_id, self.chunk_index)

    def unsigned(self) -> KVManifest:
        """This manifest without its tag: what the tag covers."""
        return replace(self, auth_tag=None)

    def to_bytes(self) -> bytes:
        """Compact wire form: a fixed struct, the block ids as uint32, five short strings, the tag."""
        fixed = _FIXED.pack(
            _VERSION, self.chunk_index, self.layer_start, self.layer_end, self.token_start, self.token_end,
            self.block_size, self.num_kv_heads, self.head_dim, self.checksum is not None, self.checksum or 0,
            len(self.dst_block_ids),
        )
        strings = [s.encode() for s in (self.request_id, self.src_worker, self.dst_worker, self.dtype, self.codec)]
        parts = [fixed, array("I", self.dst_block_ids).tobytes()]
        parts += [struct.pack("<H", len(s)) + s for s in strings]
        parts.append(bytes([len(self.auth_tag or b"")]) + (self.auth_tag or b""))
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> KVManifest:
        """Inverse of ``to_bytes``; malformed input raises ValueError."""
        try:
            fields = _FIXED.unpack_from(data)
            if fields[0] != _VERSION:
                raise ValueError(f"unknown manifest version {fields[0]}")
            offset, num_blocks = _FIXED.size, fields[-1]
            block_ids = array("I")
            block_ids.frombytes(data[offset : offset + 4 * num_blocks])
            if len(block_ids) != num_blocks:
                raise ValueError("truncated block ids")
            offset += 4 * num_blocks
            strings = []
            for _ in range(5):
                (length,) = struct.unpack_from("<H", data, offset)
                strings.append(bytes(data[offset + 2 : offset + 2 + length]).decode())
                offset += 2 + length
            tag_length = data[offset]
            auth_tag = bytes(data[offset + 1 : offset + 1 + tag_length])
            if len(auth_tag) != tag_length:
                raise ValueError("truncated auth tag")
            offset += 1 + tag_length
            if offset != len(data):
                raise ValueError(f"{len(data) - offset} trailing bytes")
        except (struct.error, UnicodeDecodeError, IndexError) as e:
            raise ValueError(f"malformed KV manifest: {e}") from e
        (_, chunk_index, layer_start, layer_end, token_start, token_end, block_size, num_kv_heads, head_dim,
         has_checksum, checksum, _) = fields
        request_id, src_worker, dst_worker, dtype, codec = strings
        return cls(
            request_id=request_id, src_worker=src_worker, dst_worker=dst_worker, chunk_index=chunk_index,
            layer_start=layer_start, layer_end=layer_end, token_start=token_start, token_end=token_end,
            block_size=block_size, dst_block_ids=tuple(block_ids), num_kv_heads=num_kv_heads, head_dim=head_dim,
            dtype=dtype, codec=codec, checksum=checksum if has_checksum else None, auth_tag=auth_tag or None,
        )
