"""KV transfer throughput: each backend against raw Gloo point-to-point and a local memcpy.

Two processes on this machine: this one receives (a CollectiveReceiver and a GrpcReceiver with
a no-op sink, plus a thread that answers raw Gloo transfers), a spawned one sends. For every
message size and repeat the sender runs each system back to back, so drifting load hits them
alike; a transfer is timed on the sender from the call until the receiver's acknowledgement:

- ``memcpy``: ``dst.copy_(src)`` in one process (the ceiling for moving bytes here);
- ``gloo_p2p``: ``ProcessGroupGloo.send`` of one uint8 tensor, then a 1-byte ack back;
- ``collective`` / ``grpc``: ``KVSender.send`` of a fp32 chunk with the raw codec (manifest,
  CRC-32 on both sides, segments, ack).

Then, at one size, each backend with each codec: payload bytes and time per chunk (encode,
transfer, decode included). Writes JSON and prints Markdown tables.

    .venv/bin/python -m bench.kv_transfer
    .venv/bin/python -m bench.kv_transfer --sizes-mib 1,4 --repeats 2 --codec-mib 4 --out /tmp/kv.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import RESULTS_DIR, ROOT, git_revision, machine_info, markdown_table
from splitserve.transfer import CODECS, KVManifest, make_receiver, make_sender
from splitserve.transfer.base import CRC32_IMPL

BACKENDS = ("collective", "grpc")
SYSTEMS = ("memcpy", "gloo_p2p", *BACKENDS)
# A chunk's geometry: 32 layers x K/V x 4 KV heads x 64 dims x fp32 = 64 KiB per token.
LAYERS, HEADS, DIM, BLOCK = 32, 4, 64, 16
TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 4
TARGET = 0.8  # each backend >= 80% of raw Gloo for large messages


def chunk(mib: int, codec: str = "raw", index: int = 0) -> tuple[KVManifest, torch.Tensor]:
    tokens = (mib << 20) // TOKEN_BYTES
    manifest = KVManifest(f"bench-{mib}", "prefill", "decode", index, 0, LAYERS, 0, tokens, BLOCK,
                          tuple(range(-(-tokens // BLOCK))), HEADS, DIM, codec=codec)
    return manifest, torch.randn(manifest.shape)


def _gloo_pair(store: dist.Store, rank: int) -> dist.ProcessGroup:
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = timedelta(seconds=600)
    return dist.ProcessGroupGloo(dist.PrefixStore("raw/", store), rank, 2, options)


def _answer_raw_gloo(group: dist.ProcessGroup) -> None:
    """Receiver side of gloo_p2p: size, then that many bytes, then an ack; size 0 ends."""
    size, ack = torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.uint8)
    buf = torch.empty(0, dtype=torch.uint8)  # reused, as the backends' receivers reuse theirs
    while True:
        group.recv([size], 1, 0).wait()
        if size.item() == 0:
            return
        if buf.numel() < size.item():
            buf = torch.empty(int(size.item()), dtype=torch.uint8)
        group.recv([buf[: int(size.item())]], 1, 0).wait()
        group.send([ack], 1, 0).wait()


def _timed_gloo(group: dist.ProcessGroup, buf: torch.Tensor) -> float:
    group.send([torch.tensor([buf.numel()])], 0, 0).wait()
    ack = torch.zeros(1, dtype=torch.uint8)
    start = time.perf_counter()
    group.send([buf], 0, 0).wait()
    group.recv([ack], 0, 0).wait()
    return time.perf_counter() - start


def _timed_memcpy(dst: torch.Tensor, buf: torch.Tensor) -> float:
    start = time.perf_counter()
    dst.copy_(buf)
    return time.perf_counter() - start


def sender_main(conn: Connection, store_port: int, endpoints: dict[str, str], args: dict) -> None:
    """The sending process: runs the whole schedule and sends the timings back."""
    torch.set_num_threads(args["threads"])
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, wait_for_workers=False)
    group = _gloo_pair(store, 1)
    senders = {b: make_sender(b, endpoints[b], timeout_s=600.0) for b in BACKENDS}
    for b in BACKENDS:  # first use builds the link: keep it out of the timings
        senders[b].send(*chunk(1))
    times: dict[str, dict[str, list[float]]] = {s: {str(m): [] for m in args["sizes_mib"]} for s in SYSTEMS}
    cpu: dict[str, dict[str, list[float]]] = {s: {str(m): [] for m in args["sizes_mib"]} for s in SYSTEMS}

    def both_cpu() -> float:
        conn.send(("cpu", None))
        return time.process_time() + conn.recv()

    for mib in args["sizes_mib"]:
        manifest, kv = chunk(mib)
        buf = kv.view(-1).view(torch.uint8)
        dst = torch.zeros_like(buf)  # touched once here: the copies below hit mapped pages
        for _ in range(args["repeats"]):
            for system in SYSTEMS:
                cpu_start = both_cpu()
                if system == "memcpy":
                    seconds = _timed_memcpy(dst, buf)
                elif system == "gloo_p2p":
                    seconds = _timed_gloo(group, buf)
                else:
                    seconds = senders[system].send(manifest, kv).seconds
                cpu[system][str(mib)].append(both_cpu() - cpu_start)
                times[system][str(mib)].append(seconds)
        conn.send(("progress", f"{mib} MiB done"))
    codecs: dict[str, dict[str, dict]] = {b: {} for b in BACKENDS}
    for b in BACKENDS:
        for codec in CODECS:
            manifest, kv = chunk(args["codec_mib"], codec)
            reports = [senders[b].send(manifest, kv) for _ in range(args["repeats"])]
            codecs[b][codec] = {"payload_bytes": reports[0].payload_nbytes, "seconds": [r.seconds for r in reports]}
    group.send([torch.zeros(1, dtype=torch.int64)], 0, 0).wait()
    for sender in senders.values():
        sender.close()
    conn.send(("done", {"times_s": times, "cpu_s": cpu, "codecs": codecs}))


def codec_costs(mib: int, repeats: int) -> dict[str, dict[str, float]]:
    """Local encode and decode seconds per codec (median), the CPU work a codec adds."""
    out = {}
    for name, codec in CODECS.items():
        manifest, kv = chunk(mib, name)
        enc, dec = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            payload = codec.encode(kv)
            enc.append(time.perf_counter() - start)
            payload = payload.clone()
            start = time.perf_counter()
            codec.decode(payload, manifest.shape, torch.float32)
            dec.append(time.perf_counter() - start)
        out[name] = {"encode_s": statistics.median(enc), "decode_s": statistics.median(dec)}
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    info = {**machine_info(), "torch": torch.__version__, "revision": git_revision(ROOT), "threads": args.threads,
            "crc32": CRC32_IMPL}
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    receivers = {b: make_receiver(b, lambda manifest, kv: None) for b in BACKENDS}
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    config = {"sizes_mib": args.sizes_mib, "repeats": args.repeats, "codec_mib": args.codec_mib,
              "threads": args.threads}
    child = ctx.Process(target=sender_main, daemon=True,
                        args=(child_conn, store.port, {b: r.endpoint for b, r in receivers.items()}, config))
    child.start()
    raw = threading.Thread(target=_answer_raw_gloo, args=(_gloo_pair(store, 0),), daemon=True)
    raw.start()
    while True:
        if not conn.poll(1.0):
            if not child.is_alive():
                raise RuntimeError(f"the sending process died (exit code {child.exitcode})")
            continue
        kind, payload = conn.recv()
        if kind == "done":
            break
        if kind == "cpu":  # the sender brackets each transfer with both processes' CPU time
            conn.send(time.process_time())
        else:
            print(payload, file=sys.stderr)
    child.join()
    raw.join()
    for receiver in receivers.values():
        receiver.stop()
    return {"machine": info, "config": {**config, "token_bytes": TOKEN_BYTES, "layers": LAYERS, "kv_heads": HEADS,
                                        "head_dim": DIM, "block_size": BLOCK},
            **payload, "codec_cpu": codec_costs(args.codec_mib, args.repeats)}


def summarize(result: dict) -> str:
    times, sizes = result["times_s"], result["config"]["sizes_mib"]

    def rate(system: str, mib: int) -> float:
        return (mib << 20) / statistics.median(times[system][str(mib)]) / 1e9

    header = ["system", *[f"{m} MiB GB/s" for m in sizes]]
    rows = [[s, *[f"{rate(s, m):.2f}" for m in sizes]] for s in SYSTEMS]
    rows += [[f"{b} / gloo_p2p", *[f"{rate(b, m) / rate('gloo_p2p', m):.0%}" for m in sizes]] for b in BACKENDS]
    cpu = result["cpu_s"]
    cpu_header = ["system", *[f"{m} MiB CPU s/GB" for m in sizes]]
    cpu_rows = [[s, *[f"{statistics.median(cpu[s][str(m)]) / ((m << 20) / 1e9):.2f}" for m in sizes]] for s in SYSTEMS]
    lines = [markdown_table(header, rows), "", markdown_table(cpu_header, cpu_rows), ""]
    large = max(sizes)
    for b in BACKENDS:
        ratio = rate(b, large) / rate("gloo_p2p", large)
        lines.append(f"target {b} >= {TARGET:.0%} of raw Gloo at {large} MiB: {ratio:.0%} "
                     f"{'MET' if ratio >= TARGET else 'NOT met'}")
    lines.append("")
    raw_bytes = result["codecs"][BACKENDS[0]]["raw"]["payload_bytes"]
    header = ["backend", "codec", "payload MiB", "bytes vs raw", "ms per chunk", "encode ms", "decode ms"]
    rows = []
    for b in BACKENDS:
        for codec, r in result["codecs"][b].items():
            cpu = result["codec_cpu"][codec]
            rows.append([b, codec, f"{r['payload_bytes'] / 2**20:.1f}", f"{r['payload_bytes'] / raw_bytes:.3f}",
                         f"{statistics.median(r['seconds']) * 1e3:.1f}", f"{cpu['encode_s'] * 1e3:.1f}",
                         f"{cpu['decode_s'] * 1e3:.1f}"])
    lines.append(markdown_table(header, rows))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--codec-mib", type=int, default=64, help="chunk size for the codec comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "kv_transfer.json")
    args = parser.parse_args()
    if min(args.sizes_mib) < 1 or args.repeats < 1:
        parser.error("sizes must be >= 1 MiB and repeats >= 1")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    m = result["machine"]
    print(f"date {m['date']}, nproc {m['nproc']}, torch {m['torch']}, threads {args.threads}, "
          f"crc32 {m['crc32']}, load average at start {m['load_average_at_start'][0]:.2f}, revision {m['revision']}")
    print(summarize(result))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
