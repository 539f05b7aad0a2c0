"""KV streaming from prefill to decode workers: manifest, wire codecs, and two backends.

A decode worker starts a receiver (``make_receiver(backend, sink)``) and hands its endpoint out
with the blocks it reserved; a prefill worker sends each chunk with a sender for that endpoint
(``make_sender(backend, endpoint)``). Backends: ``collective`` (torch.distributed
point-to-point, one 2-rank Gloo/NCCL group per sender-receiver pair) and ``grpc`` (a gRPC
streaming service, for links without NCCL). ``gather_kv``/``scatter_kv`` move chunks out of
and into a paged KV cache.
"""

from __future__ import annotations

from typing import Any

from splitserve.transfer.base import Ack, AckStatus, KVReceiver, KVSender, SendReport, Sink, TransferError
from splitserve.transfer.codec import CODECS, Codec, get_codec
from splitserve.transfer.collective import CollectiveReceiver, CollectiveSender
from splitserve.transfer.grpc_backend import GrpcReceiver, GrpcSender
from splitserve.transfer.kv_io import covering_blocks, gather_chunk, gather_kv, scatter_chunk, scatter_kv
from splitserve.transfer.manifest import KVManifest

BACKENDS: dict[str, tuple[type[KVReceiver], type[KVSender]]] = {
    "collective": (CollectiveReceiver, CollectiveSender),
    "grpc": (GrpcReceiver, GrpcSender),
}


def _backend(name: str) -> tuple[type[KVReceiver], type[KVSender]]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown KV transfer backend {name!r}; known: {', '.join(sorted(BACKENDS))}") from None


def make_receiver(backend: str, sink: Sink, **options: Any) -> KVReceiver:
    """Start a receiver of the named backend; ``options`` go to its constructor (host, port, ...)."""
    receiver_cls, _ = _backend(backend)
    return receiver_cls(sink, **options)


def make_sender(backend: str, endpoint: str, **options: Any) -> KVSender:
    """A sender to a receiver's endpoint; ``options``: timeout_s, max_retries, segment_bytes."""
    _, sender_cls = _backend(backend)
    return sender_cls(endpoint, **options)


__all__ = [
    "BACKENDS", "CODECS", "Ack", "AckStatus", "Codec", "KVManifest", "KVReceiver", "KVSender", "SendReport", "Sink",
    "TransferError", "covering_blocks", "gather_chunk", "gather_kv", "get_codec", "make_receiver", "make_sender",
    "scatter_chunk", "scatter_kv",
]
