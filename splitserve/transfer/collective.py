"""The ``collective`` backend: torch.distributed point-to-point over one 2-rank group per pair.

No global process group: a worker talks to many peers that come and go. The receiver runs a
``TCPStore`` server (its endpoint) and an acceptor thread blocked on the store's ``peers``
queue. A sender, on its first send, connects to that store, pushes a fresh session id, waits
for the receiver's verdict on it, and both sides build a 2-rank group (receiver rank 0, sender
rank 1) under the session's key prefix: ``ProcessGroupGloo`` for CPU tensors, ``ProcessGroupNCCL`` for CUDA ones (the
receiver's device decides and publishes it in the store). Each pair gets its own receiver
thread, blocked in a receive between chunks. With a deployment key the session id carries the
sender's tag and the verdict the receiver's (``KVAuth``): the receiver builds no group for a
session that does not verify or was offered before, and the sender sends nothing to a receiver
that cannot prove the key.

Per chunk, in order on the pair: one fixed-size header (magic, kind, sizes, then the manifest
bytes with the checksum; a manifest too long for it continues in one more message), the
payload in segments (the receiver checksums segment i while i + 1 arrives), and an ack
(status byte, detail) back. Small messages are what costs on a busy CPU, so there are as few
as that. A Gloo receive cannot be interrupted, so a receiver thread idle longer than
``idle_timeout_s`` gives up its group (the pair closes) and the sender transparently builds a
new one on its next send.
"""

from __future__ import annotations

import datetime
import logging
import math
import socket
import struct
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist

from splitserve.transfer.base import (
    Ack, AckStatus, KVReceiver, KVSender, Sink, TransferError, _ConnectionLost, check_reachable_host, crc32,
    remaining,
)
from splitserve.transfer.auth import KVAuth
from splitserve.transfer.manifest import KVManifest

logger = logging.getLogger(__name__)

_MAGIC = 0x4B56_5452  # "KVTR"
_CHUNK, _BYE = 1, 2
# magic, kind, manifest bytes, payload bytes, segment bytes; the manifest follows inline
_PRELUDE = struct.Struct("<IIQQQ")
_HEADER_BYTES = 4096
_INLINE_BYTES = _HEADER_BYTES - _PRELUDE.size
_ACK_BYTES = 256
_TAG = 0
_PEERS_QUEUE = "peers"
_ACCEPTED, _REFUSED = b"accepted:", b"refused:"  # a verdict: the receiver's tag (hex), or why not
_REMEMBERED_SESSIONS = 1 << 16  # offered session ids kept to refuse a replayed offer
_FOREVER = datetime.timedelta(days=365)


class Group(Protocol):
    """A c10d backend object (ProcessGroupGloo or ProcessGroupNCCL) used directly: no
    torch.distributed.ProcessGroup wrapper and no global default group."""

    def send(self, tensors: list[torch.Tensor], dst_rank: int, tag: int) -> dist.Work: ...

    def recv(self, tensors: list[torch.Tensor], src_rank: int, tag: int) -> dist.Work: ...


def _seconds(value: float) -> datetime.timedelta:
    # Whole milliseconds, rounded up: Gloo truncates to milliseconds, and a wait that ended a
    # moment before the deadline would read as a broken link instead of a missed deadline.
    return datetime.timedelta(milliseconds=max(math.ceil(value * 1000), 1))


def _make_group(store: dist.Store, rank: int, backend: str, local_host: str, timeout: datetime.timedelta) -> Group:
    """A 2-rank group on its own store prefix; Gloo binds to ``local_host``'s interface."""
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL  # absent from CPU builds

        nccl_options = ProcessGroupNCCL.Options()
        nccl_options._timeout = timeout
        return cast(Group, ProcessGroupNCCL(store, rank, 2, nccl_options))
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # Gloo's own options
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
    options._timeout = timeout
    options._threads = 1  # point-to-point does not use the collective worker threads
    return cast(Group, dist.ProcessGroupGloo(store, rank, 2, options))


def _backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _encode_ack(ack: Ack, device: torch.device) -> torch.Tensor:
    detail = ack.detail.encode()[: _ACK_BYTES - 2]
    return _as_tensor((bytes([int(ack.status), len(detail)]) + detail).ljust(_ACK_BYTES, b"\0"), device)


def _decode_ack(buf: torch.Tensor) -> Ack:
    raw = bytes(buf.cpu().numpy())
    return Ack(AckStatus(raw[0]), raw[2 : 2 + raw[1]].decode(errors="replace"))


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint must be 'host:port', got {endpoint!r}")
    return host.strip("[]"), int(port)


def _listen(host: str, port: int) -> tuple[int, int]:
    """A socket listening on ``host`` alone (a TCPStore left to listen by itself takes every
    interface): its descriptor, for the store to own and close, and its port."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    listener = socket.create_server((host, port), family=family, backlog=128)
    port = listener.getsockname()[1]
    return listener.detach(), port


def _local_address(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (what the peer can reach us at)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)  # UDP: picks the route, sends nothing
        return str(s.getsockname()[0])


class CollectiveReceiver(KVReceiver):
    """Decode side: a TCPStore for rendezvous and one thread (and group) per connected sender.

    device: where received chunks land ("cpu" -> Gloo, "cuda[:i]" -> NCCL). host: the address
    senders reach this machine at (the store and each group listen there, on that address
    alone); port 0 picks a free one for the store (groups always take free ports). auth_key:
    as KVReceiver's; a peer whose session offer does not verify gets no group.
    """

    def __init__(self, sink: Sink, *, host: str = "127.0.0.1", port: int = 0, device: str = "cpu",
                 idle_timeout_s: float = 300.0, connect_timeout_s: float = 30.0, auth_key: bytes | None = None):
        super().__init__(sink, auth_key)
        self._offered: deque[str] = deque(maxlen=_REMEMBERED_SESSIONS)
        self.num_refused_peers = 0
        self._host = check_reachable_host(host)
        self._device = torch.device(device)
        self._idle_timeout = _seconds(idle_timeout_s)
        self._connect_timeout = _seconds(connect_timeout_s)
        listen_fd, port = _listen(host, port)
        store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=self._connect_timeout,
                              master_listen_fd=listen_fd)
        store.set("backend", _backend_for(self._device))
        self._port = store.port
        self._store: dist.TCPStore | None = store
        self._acceptor = threading.Thread(target=self._accept_loop, args=(store,), name="kv-collective-accept",
                                          daemon=True)
        self._acceptor.start()

    @property
    def endpoint(self) -> str:
        return f"{self._host}:{self._port}"

    def stop(self) -> None:
        """Refuse new peers and chunks. Idle peer threads end when their sender closes or sends
        again (answered REJECTED), or after ``idle_timeout_s``: Gloo cannot cancel a receive."""
        if self._store is None:
            return
        self._is_stopped = True
        self._store.queue_push(_PEERS_QUEUE, "")  # wakes the acceptor
        self._acceptor.join(timeout=5)
        assert not self._acceptor.is_alive(), "kv receiver acceptor did not stop"
        self._store = None  # the last reference: its rendezvous server closes

    def _accept_loop(self, master: dist.TCPStore) -> None:
        queue = master.clone()  # type: ignore[attr-defined]  # in TCPStore, missing from its stubs
        queue.set_timeout(_FOREVER)
        while not self._is_stopped:
            offer = queue.queue_pop(_PEERS_QUEUE).decode(errors="replace")
            if not offer or self._is_stopped:
                break
            session, _, tag = offer.partition(".")
            refusal = self._refusal(session, tag)
            if refusal is not None:
                self.num_refused_peers += 1
                logger.warning("kv receiver %s: refused peer session %r: %s", self.endpoint, session[:64], refusal)
                if _is_session_id(session):
                    queue.set(f"pair/{session}/verdict", _REFUSED + refusal.encode())
                continue
            self._offered.append(session)
            acceptance = self._auth.tag_acceptance(session).hex() if self._auth is not None else ""
            queue.set(f"pair/{session}/verdict", _ACCEPTED + acceptance.encode())
            store = dist.PrefixStore(f"pair/{session}/", master.clone())  # type: ignore[attr-defined]
            threading.Thread(target=self._serve_peer, args=(session, store), name=f"kv-peer-{session[:8]}",
                             daemon=True).start()

    def _refusal(self, session: str, tag: str) -> str | None:
        """Why a session offer gets no group; None when it may have one."""
        if not _is_session_id(session):
            return "malformed session id"
        if session in self._offered:
            return "session offered before"
        if self._auth is not None and not self._auth.matches(_unhex(tag), self._auth.tag_session(session)):
            return "not authenticated (the sender lacks this deployment's KV auth key)"
        return None

    def _serve_peer(self, session: str, store: dist.Store) -> None:
        try:
            group = _make_group(store, 0, _backend_for(self._device), self._host, self._idle_timeout)
            logger.info("kv receiver %s: peer %s connected", self.endpoint, session)
            buffer: torch.Tensor | None = torch.empty(0, dtype=torch.uint8, device=self._device)
            while buffer is not None:
                buffer = self._serve_chunk(group, buffer)
        except RuntimeError as e:  # the peer closed, crashed or idled out: its group is done
            logger.info("kv receiver %s: peer %s gone: %s", self.endpoint, session, str(e).splitlines()[0])

    def _serve_chunk(self, group: Group, buffer: torch.Tensor) -> torch.Tensor | None:
        """Receive, verify and acknowledge one chunk into ``buffer`` (grown when too small).

        Returns the buffer for the next chunk (fresh pages cost as much as a copy), or None
        when the sender said goodbye.
        """
        header = torch.empty(_HEADER_BYTES, dtype=torch.uint8, device=self._device)
        group.recv([header], 1, _TAG).wait()
        raw = bytes(header.cpu().numpy())
        magic, kind, manifest_nbytes, payload_nbytes, segment_bytes = _PRELUDE.unpack_from(raw)
        if magic == _MAGIC and kind == _BYE:
            return None
        if magic != _MAGIC or kind != _CHUNK or min(manifest_nbytes, payload_nbytes, segment_bytes) <= 0:
            raise RuntimeError(f"bad chunk header {(magic, kind, manifest_nbytes, payload_nbytes)}; dropping the peer")
        manifest_bytes = raw[_PRELUDE.size : _PRELUDE.size + manifest_nbytes]
        if manifest_nbytes > _INLINE_BYTES:
            rest = torch.empty(manifest_nbytes - _INLINE_BYTES, dtype=torch.uint8, device=self._device)
            group.recv([rest], 1, _TAG).wait()
            manifest_bytes += bytes(rest.cpu().numpy())
        if buffer.numel() < payload_nbytes:
            buffer = torch.empty(payload_nbytes, dtype=torch.uint8, device=self._device)
        payload = buffer[:payload_nbytes]
        segments = torch.split(payload, segment_bytes)
        pending = [group.recv([segment], 1, _TAG) for segment in segments]
        computed = 0
        for work, segment in zip(pending, segments):
            work.wait()
            computed = crc32(segment, computed)
        try:
            manifest = KVManifest.from_bytes(manifest_bytes)
        except ValueError as e:
            ack = Ack(AckStatus.REJECTED, f"bad manifest: {e}")
        else:
            ack = self._ingest(manifest, payload, computed)
        group.send([_encode_ack(ack, self._device)], 1, _TAG).wait()
        return buffer


@dataclass
class _Link:
    group: Group
    device: torch.device


class CollectiveSender(KVSender):
    """Prefill side: connects to a CollectiveReceiver's endpoint on first send."""

    def __init__(self, endpoint: str, *, timeout_s: float = 30.0, max_retries: int = 3, **options: Any):
        super().__init__(endpoint, timeout_s=timeout_s, max_retries=max_retries, **options)
        self._host, self._port = _parse_endpoint(endpoint)
        self._link: _Link | None = None

    def close(self) -> None:
        with self._lock:
            link, self._link = self._link, None
            if link is not None:
                try:
                    bye = _header(_BYE, b"", 0, 0, link.device)
                    link.group.send([bye], 0, _TAG).wait(_seconds(1.0))
                except RuntimeError as e:  # the receiver is gone already; dropping the group is enough
                    logger.info("kv sender %s: goodbye not delivered: %s", self.endpoint, str(e).splitlines()[0])

    def _connect(self, deadline: float) -> _Link:
        try:
            # TCPStore retries a refused connection until its timeout; a plain probe fails fast.
            socket.create_connection((self._host, self._port), timeout=remaining(deadline)).close()
        except OSError as e:
            raise TransferError(f"no KV receiver listening at {self.endpoint}: {e}") from e
        timeout = _seconds(remaining(deadline))
        try:
            store = dist.TCPStore(self._host, self._port, is_master=False, wait_for_workers=False, timeout=timeout)
            backend = store.get("backend").decode()
            session = uuid.uuid4().hex
            tag = self._auth.tag_session(session).hex() if self._auth is not None else ""
            store.queue_push(_PEERS_QUEUE, f"{session}.{tag}")
            self._check_verdict(session, store.get(f"pair/{session}/verdict"))
            local_host = _local_address(self._host, self._port)
            group = _make_group(dist.PrefixStore(f"pair/{session}/", store), 1, backend, local_host, timeout)
        except RuntimeError as e:  # DistNetworkError / DistStoreError: no receiver, or it did not answer
            raise TransferError(f"cannot open a {self.endpoint} link: {str(e).splitlines()[0]}") from e
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return _Link(group, device)

    def _check_verdict(self, session: str, verdict: bytes) -> None:
        """TransferError unless the receiver accepted ``session`` (proving the key, with one)."""
        if verdict.startswith(_REFUSED):
            raise TransferError(f"the receiver refused it: {verdict[len(_REFUSED):].decode(errors='replace')}")
        proof = verdict[len(_ACCEPTED):] if verdict.startswith(_ACCEPTED) else None
        if proof is None or (self._auth is not None
                             and not KVAuth.matches(_unhex(proof.decode(errors="replace")),
                                                    self._auth.tag_acceptance(session))):
            raise TransferError("the receiver did not prove this deployment's KV auth key; nothing sent")

    def _transmit(self, manifest: KVManifest, payload: torch.Tensor, deadline: float) -> Ack:
        if self._link is None:
            self._link = self._connect(deadline)
        group, device = self._link.group, self._link.device
        payload = payload.to(device)
        manifest_bytes = manifest.to_bytes()
        header = _header(_CHUNK, manifest_bytes, payload.numel(), self.segment_bytes, device)
        ack = torch.empty(_ACK_BYTES, dtype=torch.uint8, device=device)
        messages = [header]
        if len(manifest_bytes) > _INLINE_BYTES:
            messages.append(_as_tensor(manifest_bytes[_INLINE_BYTES:], device))
        messages += torch.split(payload, self.segment_bytes)
        try:
            # Gloo reads straight from these tensors: ``messages`` keeps them alive until acked.
            works = [group.send([message], 0, _TAG) for message in messages]
            works.append(group.recv([ack], 0, _TAG))
            for work in works:
                work.wait(_seconds(remaining(deadline)))
        except (RuntimeError, TransferError) as e:
            self._link = None  # a timed-out or broken Gloo pair is closed for good
            if time.monotonic() >= deadline or isinstance(e, TransferError):
                raise TransferError(f"chunk {manifest.key} to {self.endpoint}: no ack before the deadline") from e
            raise _ConnectionLost(str(e).splitlines()[0]) from e
        return _decode_ack(ack)


def _as_tensor(data: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def _header(kind: int, manifest_bytes: bytes, payload_nbytes: int, segment_bytes: int,
            device: torch.device) -> torch.Tensor:
    prelude = _PRELUDE.pack(_MAGIC, kind, len(manifest_bytes), payload_nbytes, segment_bytes)
    return _as_tensor((prelude + manifest_bytes[:_INLINE_BYTES]).ljust(_HEADER_BYTES, b"\0"), device)


def _is_session_id(session: str) -> bool:
    """A session id as senders make them (a uuid4's 32 hex digits): safe as a key prefix."""
    return len(session) == 32 and all(c in "0123456789abcdef" for c in session)


def _unhex(text: str) -> bytes | None:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None
