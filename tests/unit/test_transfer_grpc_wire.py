"""The gRPC backend's hand-built KVChunkFrame encoding agrees with protobuf both ways."""

from __future__ import annotations

import pytest

from splitserve.protos.splitserve.v1 import kv_transfer_pb2 as pb
from splitserve.transfer import KVManifest
from splitserve.transfer.grpc_backend import decode_frame, encode_frame, manifest_from_pb, manifest_to_pb

MANIFEST = KVManifest("req-7", "prefill-1", "decode-2", 3, 0, 30, 16, 300, 16, tuple(range(100, 118)), 3, 64,
                      codec="int8", checksum=0x1234ABCD)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 70_000])
@pytest.mark.parametrize("with_manifest", [True, False])
def test_encoded_frames_parse_as_protobuf(size: int, with_manifest: bool):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    raw = encode_frame(MANIFEST if with_manifest else None, memoryview(data))
    frame = pb.KVChunkFrame.FromString(raw)
    assert frame.data == data
    assert frame.HasField("manifest") == with_manifest
    if with_manifest:
        assert manifest_from_pb(frame.manifest) == MANIFEST


@pytest.mark.parametrize("size", [0, 5, 200, 70_000])
def test_protobuf_frames_decode_the_same(size: int):
    data = bytes([7]) * size
    for frame in (pb.KVChunkFrame(manifest=manifest_to_pb(MANIFEST), data=data), pb.KVChunkFrame(data=data)):
        manifest, view = decode_frame(frame.SerializeToString())
        assert bytes(view) == data
        assert (manifest is not None) == frame.HasField("manifest")
        if manifest is not None:
            assert manifest_from_pb(manifest) == MANIFEST


def test_field_order_repeats_and_unknown_fields_follow_protobuf_semantics():
    manifest_part = pb.KVChunkFrame(manifest=manifest_to_pb(MANIFEST)).SerializeToString()
    data_part = pb.KVChunkFrame(data=b"first").SerializeToString()
    last_part = pb.KVChunkFrame(data=b"second").SerializeToString()
    raw = data_part + manifest_part + last_part  # data before the manifest; data twice
    manifest, view = decode_frame(raw)
    assert bytes(view) == b"second" == pb.KVChunkFrame.FromString(raw).data
    assert manifest is not None and manifest_from_pb(manifest) == MANIFEST
    unknown = raw + b"\x18\x05"  # field 3, varint 5: not ours, protobuf keeps it aside
    manifest, view = decode_frame(unknown)
    assert bytes(view) == b"second" and manifest is not None


MALFORMED = [b"\x12", b"\x12\x05abc", b"\x12\xff\xff", b"\x0a\x03\x08", b"\xff\xff\xff", b"\x0a\x02\x0a\x05"]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_frames_raise_value_error(raw: bytes):
    with pytest.raises(ValueError, match="malformed"):
        decode_frame(raw)
