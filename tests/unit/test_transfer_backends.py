"""Both transfer backends between real processes: Gloo groups and gRPC on 127.0.0.1.

The receiver (decode side) runs in the test process and scatters into its own KV cache; the
senders run in two spawned peer processes, kept for the whole module and driven over pipes,
each keeping one sender per (backend, endpoint) as a prefill worker would. Every test gets a
fresh receiver, so each peer's first send to it creates the pair's group (or channel) then.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import psutil
import pytest
import torch
import torch.distributed as dist

from splitserve.transfer import (
    KVManifest, TransferError, covering_blocks, gather_kv, make_receiver, make_sender, scatter_chunk,
)
from splitserve.transfer.auth import KVAuth

BACKENDS = ["collective", "grpc"]
LAYERS, HEADS, DIM, BLOCK, BLOCKS = 6, 2, 16, 4, 40
BACKGROUND = -7.0
SENDER_OPTIONS = dict(timeout_s=20.0, segment_bytes=4096)  # small segments: multi-segment chunks
REPLY_TIMEOUT_S = 60.0


# ---------------------------------------------------------------- the sending peer process

def _peer_main(conn: Connection) -> None:
    """A prefill-side process: runs the commands it is sent, answers each with a result."""
    senders: dict[tuple[str, str], Any] = {}
    while True:
        op, *args = conn.recv()
        try:
            if op == "exit":
                conn.send(None)
                return
            if op in ("close_all", "close_links"):  # close_links keeps the senders for reuse
                for sender in senders.values():
                    sender.close()
                if op == "close_all":
                    senders.clear()
                conn.send(None)
                continue
            backend, endpoint, options, chunks, corrupt = args
            options = dict(options)
            send_timeout_s = options.pop("send_timeout_s", None)  # this send's, not the sender's
            key = (backend, endpoint)
            if key not in senders:
                senders[key] = make_sender(backend, endpoint, **{**SENDER_OPTIONS, **options})
            conn.send([_send_one(senders[key], manifest, kv, corrupt, send_timeout_s) for manifest, kv in chunks])
        except Exception:
            conn.send(("crash", traceback.format_exc()))


def _send_one(sender: Any, manifest: KVManifest, kv: torch.Tensor, corrupt: int,
              timeout_s: float | None = None) -> dict:
    sender.inject_corruption(corrupt)
    start = time.monotonic()
    try:
        report = sender.send(manifest, kv, timeout_s=timeout_s)
    except TransferError as e:
        return {"ok": False, "error": str(e), "seconds": time.monotonic() - start}
    return {"ok": True, "attempts": report.attempts, "nbytes": report.payload_nbytes,
            "checksum": report.manifest.checksum, "seconds": time.monotonic() - start}


class Peer:
    def __init__(self) -> None:
        self.conn, child = mp.get_context("spawn").Pipe()
        self.process = mp.get_context("spawn").Process(target=_peer_main, args=(child,), daemon=True)
        self.process.start()

    def submit(self, *command: Any) -> None:
        self.conn.send(command)

    def result(self) -> Any:
        assert self.conn.poll(REPLY_TIMEOUT_S), "the peer process did not answer"
        reply = self.conn.recv()
        assert not (isinstance(reply, tuple) and reply[0] == "crash"), reply[1]
        return reply

    def send(self, backend: str, endpoint: str, chunks: list[tuple[KVManifest, torch.Tensor]],
             corrupt: int = 0, **options: Any) -> list[dict]:
        """Send chunks with the peer's sender for (backend, endpoint), made with options (the
        sender's, at its first send) except send_timeout_s, this send's own timeout."""
        self.submit("send", backend, endpoint, options, chunks, corrupt)
        return self.result()


@pytest.fixture(scope="module")
def peers() -> Iterator[tuple[Peer, Peer]]:
    pair = (Peer(), Peer())
    yield pair
    for peer in pair:
        peer.submit("exit")
        peer.result()
        peer.process.join(timeout=10)


# ---------------------------------------------------------------- the receiving side

@dataclass
class Recorder:
    """The decode worker's part: a KV cache the sink scatters into, and the chunks seen."""

    cache: torch.Tensor = field(default_factory=lambda: torch.full((LAYERS, 2, BLOCKS * BLOCK, HEADS, DIM), BACKGROUND))
    seen: list[KVManifest] = field(default_factory=list)

    def __call__(self, manifest: KVManifest, kv: torch.Tensor) -> None:
        scatter_chunk(self.cache, manifest, kv)
        self.seen.append(manifest)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def receiver(backend: str, peers: tuple[Peer, Peer]) -> Iterator[tuple[Any, Recorder]]:
    recorder = Recorder()
    rx = make_receiver(backend, recorder)
    yield rx, recorder
    for peer in peers:
        peer.submit("close_all")
        peer.result()
    rx.stop()


SRC = torch.randn(LAYERS, 2, BLOCKS * BLOCK, HEADS, DIM, generator=torch.Generator().manual_seed(0))


@dataclass(frozen=True)
class Request:
    """One request's placement: its blocks on the prefill side and on the decode side."""

    request_id: str
    src_table: tuple[int, ...]
    dst_table: tuple[int, ...]

    def chunk(self, index: int, layers: tuple[int, int], tokens: tuple[int, int],
              codec: str = "raw") -> tuple[KVManifest, torch.Tensor]:
        dst_blocks = covering_blocks(self.dst_table, *tokens, BLOCK)
        manifest = KVManifest(self.request_id, "prefill-0", "decode-0", index, *layers, *tokens, BLOCK, dst_blocks,
                              HEADS, DIM, codec=codec)
        return manifest, gather_kv(SRC, layers, covering_blocks(self.src_table, *tokens, BLOCK), tokens, BLOCK)

    def slots(self, table: tuple[int, ...], tokens: tuple[int, int]) -> list[int]:
        return [table[t // BLOCK] * BLOCK + t % BLOCK for t in range(*tokens)]


R1 = Request("r1", src_table=(0, 1, 2, 3, 4, 5), dst_table=(17, 3, 11, 8, 25, 1))
R2 = Request("r2", src_table=(6, 7, 8, 9, 10, 11), dst_table=(30, 31, 2, 12, 38, 20))


def assert_landed(cache: torch.Tensor, placed: list[tuple[Request, tuple[int, int], tuple[int, int]]]) -> None:
    """Every placed (request, layers, tokens) equals the source bitwise; every other slot is untouched."""
    untouched = torch.ones(cache.shape[:3], dtype=torch.bool)
    for request, (l0, l1), tokens in placed:
        dst, src = request.slots(request.dst_table, tokens), request.slots(request.src_table, tokens)
        assert torch.equal(cache[l0:l1, :, dst], SRC[l0:l1, :, src]), (request.request_id, (l0, l1), tokens)
        untouched[l0:l1, :, dst] = False
    assert (cache[untouched] == BACKGROUND).all(), "a slot outside the chunks was written"


def oks(results: list[dict]) -> list[dict]:
    assert all(r["ok"] for r in results), results
    return results


# ---------------------------------------------------------------- tests

def test_raw_chunks_arrive_bitwise_in_exactly_their_slots(backend, receiver, peers):
    rx, recorder = receiver
    placed = [(R1, (0, 2), (0, 13)), (R1, (2, 5), (0, 13)), (R1, (5, 6), (0, 13)), (R1, (0, 6), (13, 22))]
    chunks = [R1.chunk(i, layers, tokens) for i, (_, layers, tokens) in enumerate(placed)]
    results = oks(peers[0].send(backend, rx.endpoint, chunks))
    assert [r["attempts"] for r in results] == [1, 1, 1, 1]
    assert [r["nbytes"] for r in results] == [kv.numel() * 4 for _, kv in chunks]
    assert_landed(recorder.cache, placed)
    assert [m.key for m in recorder.seen] == [("r1", i) for i in range(4)]
    assert [m.checksum for m in recorder.seen] == [r["checksum"] for r in results]


def test_a_tail_from_a_block_aligned_start_lands_and_the_blocks_before_stay_untouched(backend, receiver, peers):
    # A decode worker with the first two blocks cached takes only tokens from 8 on.
    rx, recorder = receiver
    placed = [(R2, (0, 3), (8, 22)), (R2, (3, 6), (8, 22))]
    chunks = [R2.chunk(i, layers, tokens) for i, (_, layers, tokens) in enumerate(placed)]
    assert [m.dst_block_ids for m, _ in chunks] == [R2.dst_table[2:]] * 2
    results = oks(peers[0].send(backend, rx.endpoint, chunks))
    assert sum(r["nbytes"] for r in results) == LAYERS * 2 * 14 * HEADS * DIM * 4
    assert_landed(recorder.cache, placed)  # blocks 30 and 31 (tokens 0-7) kept the background


def test_fp16_and_int8_carry_half_and_a_quarter_of_the_bytes(backend, receiver, peers):
    rx, recorder = receiver
    tokens, layers = (2, 21), (0, LAYERS)
    results = {}
    r3 = Request("r3", R1.src_table, (5, 6, 7, 9, 10, 13))
    for i, (codec, request) in enumerate([("raw", R1), ("fp16", R2), ("int8", r3)]):
        manifest, kv = request.chunk(i, layers, tokens, codec=codec)
        (results[codec],) = oks(peers[0].send(backend, rx.endpoint, [(manifest, kv)]))
        received = recorder.cache[:, :, request.slots(request.dst_table, tokens)]
        absmax = kv.abs().amax(-1, keepdim=True)
        tolerance = {"raw": 0.0, "fp16": kv.abs() * 2**-10 + 1e-7, "int8": absmax / 254 * 1.01}[codec]
        assert ((received - kv).abs() <= tolerance).all(), codec
    raw = results["raw"]["nbytes"]
    assert results["fp16"]["nbytes"] * 2 == raw
    assert results["int8"]["nbytes"] == raw // 4 + raw // 4 // DIM * 4  # plus one fp32 scale per head vector


def test_a_corrupted_chunk_is_nacked_and_resent(backend, receiver, peers):
    rx, recorder = receiver
    (result,) = oks(peers[0].send(backend, rx.endpoint, [R1.chunk(0, (1, 4), (3, 19))], corrupt=1))
    assert result["attempts"] == 2
    assert len(recorder.seen) == 1, "the corrupted attempt must not reach the sink"
    assert_landed(recorder.cache, [(R1, (1, 4), (3, 19))])


def test_corruption_on_every_attempt_fails_after_the_retries(backend, receiver, peers):
    rx, recorder = receiver
    (result,) = peers[0].send(backend, rx.endpoint, [R1.chunk(0, (1, 4), (3, 19))], corrupt=10, max_retries=2)
    assert not result["ok"] and "3 attempts" in result["error"]
    assert recorder.seen == []
    peers[0].submit("close_all")
    peers[0].result()  # drop the sender: it still holds corruption for later tests


def test_a_duplicate_chunk_is_harmless(backend, receiver, peers):
    rx, recorder = receiver
    chunk = R2.chunk(0, (0, 3), (5, 14))
    oks(peers[0].send(backend, rx.endpoint, [chunk]))
    after_one = recorder.cache.clone()
    peers[0].submit("close_links")  # as after a lost ack: the same sender reopens its link
    peers[0].result()
    oks(peers[0].send(backend, rx.endpoint, [chunk]))
    assert torch.equal(recorder.cache, after_one)
    assert [m.key for m in recorder.seen] == [("r2", 0), ("r2", 0)]
    assert_landed(recorder.cache, [(R2, (0, 3), (5, 14))])


def test_two_senders_at_once_and_a_peer_that_joins_later(backend, receiver, peers):
    rx, recorder = receiver
    first = [R1.chunk(i, (layer, layer + 1), (0, 23)) for i, layer in enumerate(range(LAYERS))]
    second = [R2.chunk(i, (layer, layer + 1), (1, 24)) for i, layer in enumerate(range(LAYERS))]
    peers[0].submit("send", backend, rx.endpoint, {}, first, 0)
    peers[1].submit("send", backend, rx.endpoint, {}, second, 0)
    oks(peers[0].result()), oks(peers[1].result())
    placed = [(R1, (0, LAYERS), (0, 23)), (R2, (0, LAYERS), (1, 24))]
    assert_landed(recorder.cache, placed)
    # A third sender joins after both pairs exist; the first one keeps working beside it.
    late = Request("r3", src_table=(12, 13, 14), dst_table=(33, 34, 35))
    helper = Peer()
    try:
        oks(helper.send(backend, rx.endpoint, [late.chunk(0, (0, LAYERS), (0, 12))]))
        helper.submit("close_all")
        helper.result()
    finally:
        helper.submit("exit")
        helper.result()
    oks(peers[0].send(backend, rx.endpoint, [R1.chunk(9, (0, 1), (23, 24))]))
    assert_landed(recorder.cache, placed + [(late, (0, LAYERS), (0, 12)), (R1, (0, 1), (23, 24))])


def test_a_receiver_that_never_acks_makes_the_send_fail_within_its_timeout(backend, peers):
    release = threading.Event()
    taken: list[KVManifest] = []

    def sink(manifest: KVManifest, kv: torch.Tensor) -> None:  # acks the first chunk, then hangs
        taken.append(manifest)
        if len(taken) > 1:
            release.wait(60)

    rx = make_receiver(backend, sink)
    try:
        oks(peers[0].send(backend, rx.endpoint, [R1.chunk(0, (0, 2), (0, 8))]))  # the link is open
        (result,) = peers[0].send(backend, rx.endpoint, [R1.chunk(1, (2, 4), (0, 8))], send_timeout_s=1.0)
        assert not result["ok"] and "deadline" in result["error"], result
        assert 0.9 < result["seconds"] < 10, result  # not before its deadline, and not long after
        assert [m.key for m in taken] == [("r1", 0), ("r1", 1)]
    finally:
        release.set()
        peers[0].submit("close_all")
        peers[0].result()
        rx.stop()


def test_a_chunk_the_sink_refuses_fails_without_retries(backend, peers):
    def sink(manifest: KVManifest, kv: torch.Tensor) -> None:
        raise KeyError(f"no blocks reserved for {manifest.request_id}")

    rx = make_receiver(backend, sink)
    try:
        (result,) = peers[0].send(backend, rx.endpoint, [R1.chunk(0, (0, 2), (0, 8))])
        assert not result["ok"] and "rejected" in result["error"] and "no blocks reserved for r1" in result["error"]
    finally:
        peers[0].submit("close_all")
        peers[0].result()
        rx.stop()


def test_sending_to_a_stopped_receiver_raises_transfer_error(backend, peers):
    rx = make_receiver(backend, Recorder())
    oks(peers[0].send(backend, rx.endpoint, [R1.chunk(0, (0, 1), (0, 4))], timeout_s=30.0))
    rx.stop()
    (kept_link,) = peers[0].send(backend, rx.endpoint, [R1.chunk(1, (0, 1), (4, 8))])
    peers[0].submit("close_all")
    peers[0].result()
    (new_link,) = peers[0].send(backend, rx.endpoint, [R1.chunk(1, (0, 1), (4, 8))], timeout_s=30.0)
    for result in (kept_link, new_link):  # refused at once, not after the 30 s timeout
        assert not result["ok"] and result["seconds"] < 10, (kept_link, new_link)
    peers[0].submit("close_all")
    peers[0].result()


KEY, OTHER_KEY = b"deployment-key-0123456789", b"someone-else-0123456789"


@pytest.mark.parametrize("sender_key", [KEY, OTHER_KEY, None], ids=["same key", "other key", "no key"])
def test_with_a_deployment_key_only_senders_holding_it_get_chunks_in(backend, peers, sender_key):
    recorder = Recorder()
    rx = make_receiver(backend, recorder, auth_key=KEY)
    try:
        (result,) = peers[0].send(backend, rx.endpoint, [R1.chunk(0, (0, 2), (0, 8))], auth_key=sender_key)
        if sender_key == KEY:
            oks([result])
            assert_landed(recorder.cache, [(R1, (0, 2), (0, 8))])
        else:  # refused at once, and nothing reached the cache
            assert not result["ok"] and "not authenticated" in result["error"] and result["seconds"] < 10, result
            assert recorder.seen == [] and (recorder.cache == BACKGROUND).all()
    finally:
        peers[0].submit("close_all")
        peers[0].result()
        rx.stop()


def test_a_keyed_collective_sender_sends_nothing_to_a_receiver_without_the_key(peers):
    recorder = Recorder()
    rx = make_receiver("collective", recorder)
    try:
        (result,) = peers[0].send("collective", rx.endpoint, [R1.chunk(0, (0, 2), (0, 8))], auth_key=KEY)
        assert not result["ok"] and "did not prove" in result["error"] and recorder.seen == [], result
    finally:
        peers[0].submit("close_all")
        peers[0].result()
        rx.stop()


def test_a_collective_receiver_builds_no_group_for_a_forged_or_replayed_session():
    """A peer speaking the rendezvous protocol by hand: garbage, a made-up tag, then a valid
    offer twice; only the first valid one gets a verdict of acceptance (and a pair thread)."""
    rx = make_receiver("collective", Recorder(), auth_key=KEY, idle_timeout_s=2.0)
    host, port = rx.endpoint.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=20))
    forged, valid = "ab" * 16, "cd" * 16
    try:
        before = peer_threads()
        store.queue_push("peers", "../../backend")
        store.queue_push("peers", f"{forged}.{'00' * 16}")
        assert store.get(f"pair/{forged}/verdict").startswith(b"refused:not authenticated")
        store.queue_push("peers", f"{valid}.{KVAuth(KEY).tag_session(valid).hex()}")
        assert store.get(f"pair/{valid}/verdict") == b"accepted:" + KVAuth(KEY).tag_acceptance(valid).hex().encode()
        store.queue_push("peers", f"{valid}.{KVAuth(KEY).tag_session(valid).hex()}")
        deadline = time.monotonic() + 20
        while rx.num_refused_peers < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.get(f"pair/{valid}/verdict") == b"refused:session offered before"
        assert store.get("backend") == b"gloo" and len(peer_threads() - before) <= 1
    finally:
        rx.stop()


def test_a_receiver_and_its_pairs_listen_on_its_host_alone(backend, peers):
    """Never a wildcard address: a TCPStore or a server left to itself would take every interface."""
    def listening() -> set[tuple[str, int]]:
        return {(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port)  # gRPC: an IPv4-mapped IPv6 socket
                for c in psutil.Process().net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}

    before = listening()
    rx = make_receiver(backend, Recorder())
    try:
        oks(peers[0].send(backend, rx.endpoint, [R1.chunk(0, (0, 2), (0, 8))]))
        opened = listening() - before
        assert ("127.0.0.1", int(rx.endpoint.rsplit(":", 1)[1])) in opened
        assert {ip for ip, _ in opened} == {"127.0.0.1"}, opened
    finally:
        peers[0].submit("close_all")
        peers[0].result()
        rx.stop()


def peer_threads() -> set[threading.Thread]:
    """The collective receivers' threads serving a pair (one per connected sender)."""
    return {t for t in threading.enumerate() if t.name.startswith("kv-peer-")}


def test_an_idle_collective_pair_is_rebuilt_on_the_next_send(peers):
    recorder = Recorder()
    # 2 s: also the time the pair's group has to form, so it must outlast a slow rendezvous.
    rx = make_receiver("collective", recorder, idle_timeout_s=2.0)
    try:
        before = peer_threads()
        oks(peers[0].send("collective", rx.endpoint, [R1.chunk(0, (0, 2), (0, 8))]))
        pair = peer_threads() - before
        assert len(pair) == 1
        # The receiver's pending receive times out and closes the pair: its thread ends.
        deadline = time.monotonic() + 60
        while any(t.is_alive() for t in pair) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(t.is_alive() for t in pair), "the idle pair was not closed"
        oks(peers[0].send("collective", rx.endpoint, [R1.chunk(1, (2, 4), (0, 8))]))
        assert_landed(recorder.cache, [(R1, (0, 2), (0, 8)), (R1, (2, 4), (0, 8))])
    finally:
        peers[0].submit("close_all")
        peers[0].result()
        rx.stop()


def test_unknown_backends_and_mismatched_tensors_raise_value_error():
    with pytest.raises(ValueError, match="unknown KV transfer backend 'rdma'"):
        make_receiver("rdma", Recorder())
    with pytest.raises(ValueError, match="unknown KV transfer backend"):
        make_sender("rdma", "127.0.0.1:1")
    with pytest.raises(ValueError, match="host:port"):
        make_sender("collective", "nowhere")
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="senders can reach"):
            make_receiver(backend, Recorder(), host="0.0.0.0")
    manifest, kv = R1.chunk(0, (0, 2), (0, 8))
    for backend in BACKENDS:
        with make_sender(backend, "127.0.0.1:1") as sender, pytest.raises(ValueError, match="does not match"):
            sender.send(manifest, kv[:, :, :4])
