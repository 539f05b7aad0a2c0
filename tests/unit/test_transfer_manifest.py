"""KVManifest: validation at construction, the compact wire form, the protobuf edge."""

from __future__ import annotations

from dataclasses import replace

import pytest

from splitserve.transfer import KVManifest
from splitserve.transfer.auth import KVAuth
from splitserve.transfer.grpc_backend import manifest_from_pb, manifest_to_pb


def manifest(**overrides: object) -> KVManifest:
    fields: dict[str, object] = dict(
        request_id="req-1", src_worker="prefill-0", dst_worker="decode-3", chunk_index=2, layer_start=4,
        layer_end=8, token_start=10, token_end=40, block_size=16, dst_block_ids=(7, 3, 9), num_kv_heads=3,
        head_dim=64,
    )
    fields.update(overrides)
    return KVManifest(**fields)  # type: ignore[arg-type]


def test_shape_and_derived_fields():
    m = manifest(dtype="bfloat16", codec="int8")
    assert m.shape == (4, 2, 30, 3, 64)
    assert (m.num_layers, m.num_tokens, m.key) == (4, 30, ("req-1", 2))
    assert m.checksum is None


def test_block_ids_are_stored_as_a_tuple():
    assert manifest(dst_block_ids=[7, 3, 9]).dst_block_ids == (7, 3, 9)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(request_id=""), "request_id"),
        (dict(src_worker=""), "src_worker"),
        (dict(layer_start=8, layer_end=8), "layer range"),
        (dict(layer_start=-1), "layer range"),
        (dict(token_start=40, token_end=40), "token range"),
        (dict(token_start=50, token_end=40), "token range"),
        (dict(dst_block_ids=(7, 3)), "span 3 blocks"),
        (dict(dst_block_ids=(7, 3, 9, 11)), "span 3 blocks"),
        (dict(dst_block_ids=(7, 7, 9)), "distinct"),
        (dict(dst_block_ids=(7, -3, 9)), "dst_block_ids"),
        (dict(block_size=0), "block_size"),
        (dict(head_dim=0), "head_dim"),
        (dict(chunk_index=-1), "chunk_index"),
        (dict(dtype="int4"), "dtype"),
        (dict(codec="zstd"), "codec"),
        (dict(checksum=1 << 32), "checksum"),
        (dict(auth_tag=b""), "auth_tag"),
        (dict(auth_tag=b"x" * 256), "auth_tag"),
    ],
)
def test_invalid_manifests_raise_value_error(overrides: dict, message: str):
    with pytest.raises(ValueError, match=message):
        manifest(**overrides)


def test_blocks_cover_exactly_the_token_range():
    # Tokens 16..31 sit in one block; 15..32 touch three.
    assert manifest(token_start=16, token_end=32, dst_block_ids=(5,)).dst_block_ids == (5,)
    assert len(manifest(token_start=15, token_end=33, dst_block_ids=(1, 2, 3)).dst_block_ids) == 3


@pytest.mark.parametrize("checksum, auth_tag", [(None, None), (0, None), (0xDEADBEEF, b"\x00tag" * 4)])
def test_bytes_round_trip(checksum: int | None, auth_tag: bytes | None):
    m = manifest(checksum=checksum, auth_tag=auth_tag, codec="fp16", dtype="float16", request_id="ünïcode-req")
    data = m.to_bytes()
    assert KVManifest.from_bytes(data) == m
    assert len(data) < 120  # a small header next to megabytes of KV


def test_bytes_round_trip_with_many_blocks():
    m = manifest(token_start=0, token_end=16 * 1000, dst_block_ids=tuple(range(2000, 3000)))
    assert KVManifest.from_bytes(m.to_bytes()) == m


@pytest.mark.parametrize("cut", [0, 5, 30, -1])
def test_truncated_bytes_raise_value_error(cut: int):
    data = manifest().to_bytes()
    with pytest.raises(ValueError):
        KVManifest.from_bytes(data[:cut])


def test_trailing_or_foreign_bytes_raise_value_error():
    data = manifest().to_bytes()
    with pytest.raises(ValueError, match="trailing"):
        KVManifest.from_bytes(data + b"x")
    with pytest.raises(ValueError, match="version"):
        KVManifest.from_bytes(b"\x09" + data[1:])


def test_protobuf_round_trip_and_validation():
    m = manifest(checksum=None, codec="int8")
    assert manifest_from_pb(manifest_to_pb(m)) == m
    assert manifest_from_pb(manifest_to_pb(replace(m, checksum=0))) == replace(m, checksum=0)
    tagged = replace(m, checksum=7, auth_tag=b"t" * 16)
    assert manifest_from_pb(manifest_to_pb(tagged)) == tagged
    bad = manifest_to_pb(m)
    del bad.dst_block_ids[-1]
    with pytest.raises(ValueError, match="span"):
        manifest_from_pb(bad)


def test_a_manifest_tag_verifies_only_that_manifest_with_that_key():
    key = KVAuth(b"k" * 32)
    signed = manifest(checksum=0xDEADBEEF)
    tag = key.tag_manifest(signed.to_bytes())
    arrived = KVManifest.from_bytes(replace(signed, auth_tag=tag).to_bytes())
    assert KVAuth.matches(arrived.auth_tag, key.tag_manifest(arrived.unsigned().to_bytes()))
    for changed in (replace(signed, checksum=0xDEADBEEE), replace(signed, dst_block_ids=(7, 3, 8)),
                    replace(signed, request_id="req-2")):
        assert not KVAuth.matches(tag, key.tag_manifest(changed.to_bytes()))
    assert not KVAuth.matches(tag, KVAuth(b"o" * 32).tag_manifest(signed.to_bytes()))
    assert not KVAuth.matches(None, tag)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        KVAuth(b"short")
    assert repr(key) == "KVAuth(<key>)"
