"""The transfer interface: a KVReceiver on the decode side, a KVSender on the prefill side.

A decode worker starts one receiver with a sink (``sink(manifest, kv)``, which scatters the
chunk into its cache and tracks completion) and hands its ``endpoint`` out with the blocks it
reserved. A prefill worker makes a sender per receiver endpoint and calls ``send`` per chunk;
``send`` returns once the receiver has verified the chunk and its sink returned.

What every backend shares lives here: encoding, the CRC-32 of the encoded payload (computed
once per send; the receiver recomputes it while the bytes arrive), checksum verification and
the NACK/re-send loop, the deadline, the sink call, and, with a deployment key (``auth_key``),
each manifest's tag and its check before the sink sees anything (``splitserve.transfer.auth``).
Backends only move a manifest and payload bytes one way and an ``Ack`` back.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from splitserve.transfer.auth import kv_auth
from splitserve.transfer.codec import get_codec
from splitserve.transfer.manifest import KVManifest

logger = logging.getLogger(__name__)

# The decode worker's callback: the chunk's manifest (checksum verified) and its tensor in the
# cache dtype. Calls are serialized per receiver; the same chunk may arrive twice. The tensor
# is valid only during the call (it may view a reused receive buffer): copy what you keep.
Sink = Callable[[KVManifest, torch.Tensor], None]


class TransferError(RuntimeError):
    """A chunk did not arrive: timeout, refusal by the receiver, or repeated corruption."""


class _ConnectionLost(Exception):
    """A backend's link broke mid-chunk; the sender reconnects and re-sends if time allows."""


class AckStatus(enum.IntEnum):
    OK = 0
    CHECKSUM_MISMATCH = 1  # NACK: the sender re-sends
    REJECTED = 2  # the receiver will not take this chunk (bad manifest, sink refused, stopped)


@dataclass(frozen=True)
class Ack:
    status: AckStatus
    detail: str = ""


@dataclass(frozen=True)
class SendReport:
    """What one ``send`` did: the manifest as sent (with its checksum), tries, bytes, time."""

    manifest: KVManifest
    attempts: int
    payload_nbytes: int
    seconds: float


try:  # ISA-L computes the same CRC-32 as zlib, ~5x faster (PCLMUL); peers may mix the two
    from isal.isal_zlib import crc32 as _crc32

    CRC32_IMPL = "isal"
except ImportError:
    from zlib import crc32 as _crc32

    CRC32_IMPL = "zlib"


def crc32(data: torch.Tensor | bytes | memoryview, value: int = 0) -> int:
    """CRC-32 (zlib's) of a uint8 tensor's or a buffer's bytes, continuing from ``value``."""
    return _crc32(data.cpu().numpy() if isinstance(data, torch.Tensor) else data, value)


class KVReceiver(ABC):
    """Accepts chunks from any number of senders and hands each verified chunk to the sink.
    auth_key: the deployment's shared secret; chunks (and collective peers) without it are
    refused (None: any peer is taken)."""

    def __init__(self, sink: Sink, auth_key: bytes | None = None):
        self._auth = kv_auth(auth_key)
        self._sink = sink
        self._sink_lock = threading.Lock()
        self._is_stopped = False

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Where senders connect (``host:port``); pass it to ``make_sender``."""

    @abstractmethod
    def stop(self) -> None:
        """Refuse new senders and chunks and release the listening resources."""

    def __enter__(self) -> KVReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ingest(self, manifest: KVManifest, payload: torch.Tensor, computed_crc: int) -> Ack:
        """Verify one received chunk and give it to the sink; the answer goes back to the sender."""
        if self._is_stopped:
            return Ack(AckStatus.REJECTED, "receiver stopped")
        refusal = self._unauthenticated(manifest)
        if refusal is not None:
            return refusal
        if manifest.checksum != computed_crc:
            logger.warning("chunk %s: checksum %08x != computed %08x; NACK",
                           manifest.key, manifest.checksum, computed_crc)
            return Ack(AckStatus.CHECKSUM_MISMATCH, f"checksum mismatch on chunk {manifest.key}")
        codec = get_codec(manifest.codec)
        expected = codec.nbytes(manifest.shape, manifest.torch_dtype)
        if payload.numel() != expected:
            return Ack(AckStatus.REJECTED, f"payload has {payload.numel()} bytes, manifest implies {expected}")
        try:
            kv = codec.decode(payload, manifest.shape, manifest.torch_dtype)
            with self._sink_lock:
                self._sink(manifest, kv)
        except Exception as e:  # reported to the sender, which fails its send with this text
            logger.exception("sink refused chunk %s", manifest.key)
            return Ack(AckStatus.REJECTED, f"sink refused chunk {manifest.key}: {type(e).__name__}: {e}")
        return Ack(AckStatus.OK)

    def _unauthenticated(self, manifest: KVManifest) -> Ack | None:
        """The refusal of a chunk whose tag does not verify with this receiver's key; None if
        it does (or the receiver has no key)."""
        if self._auth is None or self._auth.matches(manifest.auth_tag,
                                                    self._auth.tag_manifest(manifest.unsigned().to_bytes())):
            return None
        logger.warning("chunk %s from %s: not authenticated; refused", manifest.key, manifest.src_worker)
        return Ack(AckStatus.REJECTED, f"chunk {manifest.key} is not authenticated (its sender lacks this "
                                       f"deployment's KV auth key)")


class KVSender(ABC):
    """Sends chunks to one receiver endpoint; ``send`` blocks until the chunk is acknowledged.

    timeout_s bounds each ``send`` (all re-sends included); max_retries bounds re-sends after
    NACKs and broken links; segment_bytes is the slice size on the wire (None: the backend's
    default). auth_key: the deployment's shared secret, which tags every manifest (None: no
    tag). Thread-safe: concurrent sends on one sender go one at a time.
    """

    default_segment_bytes = 16 << 20  # payloads move (and are checksummed on arrival) in such slices

    def __init__(self, endpoint: str, *, timeout_s: float = 30.0, max_retries: int = 3,
                 segment_bytes: int | None = None, auth_key: bytes | None = None):
        segment_bytes = segment_bytes or self.default_segment_bytes
        if timeout_s <= 0 or max_retries < 0 or segment_bytes <= 0:
            raise ValueError(f"need timeout_s > 0, max_retries >= 0, segment_bytes > 0; got "
                             f"{timeout_s}, {max_retries}, {segment_bytes}")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.segment_bytes = segment_bytes
        self._auth = kv_auth(auth_key)
        self._lock = threading.Lock()
        self._num_corrupt_sends = 0

    def send(self, manifest: KVManifest, kv: torch.Tensor, *, timeout_s: float | None = None) -> SendReport:
        """Encode ``kv`` with the manifest's codec, checksum it, ship it and wait for the ack.

        Any checksum (and tag) already in ``manifest`` is replaced by the payload's. Raises ValueError
        when ``kv`` does not match the manifest, TransferError when the chunk did not land.
        """
        if tuple(kv.shape) != manifest.shape or kv.dtype != manifest.torch_dtype:
            raise ValueError(f"kv tensor {tuple(kv.shape)} {kv.dtype} does not match the manifest's "
                             f"{manifest.shape} {manifest.dtype}")
        start = time.monotonic()
        deadline = start + (self.timeout_s if timeout_s is None else timeout_s)
        payload = get_codec(manifest.codec).encode(kv)
        manifest = replace(manifest, checksum=crc32(payload), auth_tag=None)
        if self._auth is not None:
            manifest = replace(manifest, auth_tag=self._auth.tag_manifest(manifest.to_bytes()))
        problem = ""
        with self._lock:
            for attempt in range(1, self.max_retries + 2):
                try:
                    ack = self._transmit(manifest, self._maybe_corrupt(payload), deadline)
                except _ConnectionLost as e:
                    problem = f"link lost: {e}"
                    logger.warning("chunk %s attempt %d: %s; reconnecting", manifest.key, attempt, problem)
                    continue
                if ack.status == AckStatus.OK:
                    return SendReport(manifest, attempt, payload.numel(), time.monotonic() - start)
                if ack.status == AckStatus.REJECTED:
                    raise TransferError(f"{self.endpoint} rejected chunk {manifest.key}: {ack.detail}")
                problem = ack.detail
                logger.warning("chunk %s attempt %d: NACK (%s); re-sending", manifest.key, attempt, problem)
        raise TransferError(
            f"chunk {manifest.key} to {self.endpoint} failed {self.max_retries + 1} attempts (last: {problem})"
        )

    @abstractmethod
    def _transmit(self, manifest: KVManifest, payload: torch.Tensor, deadline: float) -> Ack:
        """Ship one attempt (the manifest carries the checksum) and return the receiver's ack.

        Raise TransferError past ``deadline`` and _ConnectionLost when the link broke.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the link to the receiver (a later send opens a new one)."""

    def __enter__(self) -> KVSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def inject_corruption(self, num_sends: int = 1) -> None:
        """Test hook: the next ``num_sends`` attempts flip a payload byte after checksumming it."""
        self._num_corrupt_sends += num_sends

    def _maybe_corrupt(self, payload: torch.Tensor) -> torch.Tensor:
        if self._num_corrupt_sends <= 0:
            return payload
        self._num_corrupt_sends -= 1
        corrupted = payload.clone()  # the caller's tensor stays intact for the re-send
        corrupted[corrupted.numel() // 2] ^= 0xFF
        return corrupted


def check_reachable_host(host: str) -> str:
    """``host`` as given, unless it is a wildcard that a sender on another machine cannot dial."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        raise ValueError(f"host must be an address senders can reach (it is part of the endpoint), got {host!r}")
    return host


def remaining(deadline: float) -> float:
    """Seconds left before ``deadline``; TransferError when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransferError("send timed out")
    return left
