"""The ``grpc`` backend: a KVTransfer gRPC server on the decode side, one call per chunk.

For links without NCCL (between machines, or to a worker without a shared torch group). The
receiver is a gRPC server (thread pool; health and reflection enabled) implementing
``splitserve.v1.KVTransfer/PushChunk`` (protos/splitserve/v1/kv_transfer.proto); the sender
keeps one channel per endpoint and streams each chunk as frames of ``segment_bytes`` payload
bytes, the first carrying the manifest (and so the CRC-32). The call's deadline is
the send's timeout. Protobuf stays here: the rest of the package sees KVManifest and tensors.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve.protos.splitserve.v1 import kv_transfer_pb2 as pb
from splitserve.transfer.base import (
    Ack, AckStatus, KVReceiver, KVSender, Sink, TransferError, _ConnectionLost, check_reachable_host, crc32,
    remaining,
)
from splitserve.transfer.codec import get_codec
from splitserve.transfer.manifest import KVManifest

logger = logging.getLogger(__name__)

_METHOD = pb.DESCRIPTOR.services_by_name["KVTransfer"].methods_by_name["PushChunk"]
_SERVICE = _METHOD.containing_service.full_name
_PUSH_CHUNK_PATH = f"/{_SERVICE}/{_METHOD.name}"
MAX_FRAME_BYTES = 64 << 20
_ACK_TO_PB = {
    AckStatus.OK: pb.KVAck.STATUS_OK,
    AckStatus.CHECKSUM_MISMATCH: pb.KVAck.STATUS_CHECKSUM_MISMATCH,
    AckStatus.REJECTED: pb.KVAck.STATUS_REJECTED,
}
_PB_TO_ACK = {v: k for k, v in _ACK_TO_PB.items()}
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_FRAME_BYTES),
    ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
]


def manifest_to_pb(m: KVManifest) -> pb.KVManifest:
    return pb.KVManifest(
        request_id=m.request_id, src_worker=m.src_worker, dst_worker=m.dst_worker, chunk_index=m.chunk_index,
        layer_start=m.layer_start, layer_end=m.layer_end, token_start=m.token_start, token_end=m.token_end,
        block_size=m.block_size, dst_block_ids=m.dst_block_ids, num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim, dtype=m.dtype, codec=m.codec, checksum=m.checksum, auth_tag=m.auth_tag,
    )


def manifest_from_pb(p: pb.KVManifest) -> KVManifest:
    """ValueError when the fields do not make a valid manifest."""
    return KVManifest(
        request_id=p.request_id, src_worker=p.src_worker, dst_worker=p.dst_worker, chunk_index=p.chunk_index,
        layer_start=p.layer_start, layer_end=p.layer_end, token_start=p.token_start, token_end=p.token_end,
        block_size=p.block_size, dst_block_ids=tuple(p.dst_block_ids), num_kv_heads=p.num_kv_heads,
        head_dim=p.head_dim, dtype=p.dtype, codec=p.codec,
        checksum=p.checksum if p.HasField("checksum") else None,
        auth_tag=p.auth_tag if p.HasField("auth_tag") else None,
    )


# KVChunkFrame's two fields, both length-delimited: tag bytes (field number << 3 | wire type 2).
_MANIFEST_TAG, _DATA_TAG = b"\x0a", b"\x12"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_frame(manifest: KVManifest | None, data: memoryview) -> bytes:
    """A serialized KVChunkFrame, built with a single copy of ``data``.

    Protobuf's own path would copy a payload slice three times (to bytes, into the message,
    out again); the encoding is the same, so any KVTransfer client or server can read it.
    """
    head = pb.KVChunkFrame(manifest=manifest_to_pb(manifest)).SerializeToString() if manifest else b""
    return b"".join((head, _DATA_TAG, _varint(len(data)), data))


def decode_frame(raw: bytes) -> tuple[pb.KVManifest | None, memoryview]:
    """(manifest if present, payload slice) of a serialized KVChunkFrame; the slice is zero-copy.

    Walks the top-level fields itself (both are length-delimited); anything else it hands to
    protobuf. Raises ValueError on a malformed frame.
    """
    view, pos, manifest, data = memoryview(raw), 0, None, memoryview(b"")
    while pos < len(raw):
        tag = raw[pos : pos + 1]
        if tag not in (_MANIFEST_TAG, _DATA_TAG):
            return _decode_frame_with_protobuf(raw)
        length, shift, pos = 0, 0, pos + 1
        while True:  # varint
            if pos >= len(raw) or shift > 63:
                raise ValueError("malformed KVChunkFrame: truncated length")
            length |= (raw[pos] & 0x7F) << shift
            shift, pos = shift + 7, pos + 1
            if raw[pos - 1] < 0x80:
                break
        if pos + length > len(raw):
            raise ValueError("malformed KVChunkFrame: field runs past the end")
        if tag == _MANIFEST_TAG:
            manifest = manifest or pb.KVManifest()
            try:
                manifest.MergeFromString(view[pos : pos + length])
            except DecodeError as e:
                raise ValueError(f"malformed KVChunkFrame manifest: {e}") from e
        else:
            data = view[pos : pos + length]  # a repeated scalar field: the last one wins
        pos += length
    return manifest, data


def _decode_frame_with_protobuf(raw: bytes) -> tuple[pb.KVManifest | None, memoryview]:
    try:
        frame = pb.KVChunkFrame.FromString(raw)
    except DecodeError as e:
        raise ValueError(f"malformed KVChunkFrame: {e}") from e
    return (frame.manifest if frame.HasField("manifest") else None), memoryview(frame.data)


def _push_chunk_handler(receiver: GrpcReceiver) -> grpc.GenericRpcHandler:
    """PushChunk with raw frames in (decoded by ``decode_frame``), KVAck out."""

    def push_chunk(frames: Iterator[bytes], context: grpc.ServicerContext) -> pb.KVAck:
        ack = receiver._receive(frames)
        return pb.KVAck(status=_ACK_TO_PB[ack.status], detail=ack.detail)

    handler = grpc.stream_unary_rpc_method_handler(push_chunk, response_serializer=pb.KVAck.SerializeToString)
    return grpc.method_handlers_generic_handler(_SERVICE, {_METHOD.name: handler})


class GrpcReceiver(KVReceiver):
    """Decode side: a gRPC server whose PushChunk calls go through verification to the sink.

    host/port: where to listen, an address senders can reach (port 0 picks a free one); the
    endpoint is ``host:port``.
    max_workers bounds concurrent chunk calls (one per sending peer is typical). auth_key: as
    KVReceiver's; a chunk whose tag does not verify is refused before its payload is read.
    """

    def __init__(self, sink: Sink, *, host: str = "127.0.0.1", port: int = 0, max_workers: int = 8,
                 auth_key: bytes | None = None):
        super().__init__(sink, auth_key)
        self._host = check_reachable_host(host)
        self._buffers = threading.local()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers, thread_name_prefix="kv-grpc"),
                                   options=_CHANNEL_OPTIONS)
        self._server.add_generic_rpc_handlers((_push_chunk_handler(self),))
        health_servicer = health.HealthServicer()
        health_servicer.set(_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._server)
        reflection.enable_server_reflection([_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)
        self._port = self._server.add_insecure_port(f"{host}:{port}")
        if self._port == 0:
            raise ValueError(f"cannot listen on {host}:{port}")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"{self._host}:{self._port}"

    def stop(self) -> None:
        self._is_stopped = True
        self._server.stop(grace=1.0).wait()

    def _buffer(self, nbytes: int) -> np.ndarray:
        """This handler thread's receive buffer, grown when too small (fresh pages cost a copy)."""
        buffer = getattr(self._buffers, "buffer", None)
        if buffer is None or buffer.size < nbytes:
            buffer = self._buffers.buffer = np.empty(nbytes, dtype=np.uint8)
        return buffer[:nbytes]

    def _receive(self, frames: Iterator[bytes]) -> Ack:
        try:
            manifest_pb, data = decode_frame(next(frames, b""))
            if manifest_pb is None:
                return Ack(AckStatus.REJECTED, "the first frame must carry the manifest")
            manifest = manifest_from_pb(manifest_pb)
        except ValueError as e:
            return Ack(AckStatus.REJECTED, f"bad first frame: {e}")
        if manifest.checksum is None:
            return Ack(AckStatus.REJECTED, "the manifest carries no checksum")
        refusal = self._unauthenticated(manifest)
        if refusal is not None:
            return refusal
        payload = self._buffer(get_codec(manifest.codec).nbytes(manifest.shape, manifest.torch_dtype))
        offset, computed = 0, 0
        while True:
            if offset + len(data) > payload.size:
                return Ack(AckStatus.REJECTED, f"payload longer than the {payload.size} bytes the manifest implies")
            payload[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
            computed = crc32(data, computed)
            offset += len(data)
            raw = next(frames, None)
            if raw is None:
                break
            try:
                _, data = decode_frame(raw)
            except ValueError as e:
                return Ack(AckStatus.REJECTED, str(e))
        if offset != payload.size:
            return Ack(AckStatus.REJECTED, f"incomplete chunk: {offset} of {payload.size} bytes")
        return self._ingest(manifest, torch.from_numpy(payload), computed)


class GrpcSender(KVSender):
    """Prefill side: one channel to a GrpcReceiver (opened on first send), one streaming call
    per chunk attempt."""

    # Frames under gRPC's default 4 MiB message limit; small enough that the receiver copies
    # and checksums one while the next is in flight.
    default_segment_bytes = 1 << 20

    def __init__(self, endpoint: str, *, timeout_s: float = 30.0, max_retries: int = 3, **options: Any):
        super().__init__(endpoint, timeout_s=timeout_s, max_retries=max_retries, **options)
        if self.segment_bytes > MAX_FRAME_BYTES - (1 << 20):
            raise ValueError(f"segment_bytes must leave room in a {MAX_FRAME_BYTES}-byte gRPC frame")
        self._channel: grpc.Channel | None = None

    def close(self) -> None:
        with self._lock:
            channel, self._channel = self._channel, None
            if channel is not None:
                channel.close()

    def _transmit(self, manifest: KVManifest, payload: torch.Tensor, deadline: float) -> Ack:
        def frames() -> Iterator[bytes]:
            data = payload.cpu().numpy().data
            for start in range(0, len(data), self.segment_bytes):
                yield encode_frame(manifest if start == 0 else None, data[start : start + self.segment_bytes])

        if self._channel is None:
            self._channel = grpc.insecure_channel(self.endpoint, options=_CHANNEL_OPTIONS)
        push_chunk = self._channel.stream_unary(_PUSH_CHUNK_PATH, response_deserializer=pb.KVAck.FromString)
        try:
            reply = push_chunk(frames(), timeout=remaining(deadline))
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TransferError(f"chunk {manifest.key} to {self.endpoint}: no ack before the deadline") from e
            if code == grpc.StatusCode.UNAVAILABLE:
                raise _ConnectionLost(f"{self.endpoint} unavailable: {e.details() if isinstance(e, grpc.Call) else e}")
            raise TransferError(f"chunk {manifest.key} to {self.endpoint} failed: {e}") from e
        return Ack(_PB_TO_ACK.get(reply.status, AckStatus.REJECTED), reply.detail)
