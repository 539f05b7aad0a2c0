"""KV transfer bandwidth per backend, measured by sending a prompt's KV through the real backend.

For each backend a receiver and a sender (splitserve.transfer's, as the workers make them) talk
over 127.0.0.1 inside this process: the KV of ``num_tokens`` tokens goes in chunks of
``layers_per_chunk`` layers, the way a prefill worker streams a prompt, once untimed (the link
is set up then) and ``repeats`` times timed. The receiver's sink takes each chunk and drops it,
so the number covers encoding, checksums, the wire and the acknowledgement, not the scatter
into the decode worker's cache; both ends share this process's CPUs (and Python's lock), as two
workers on one machine share its cores.
"""

from __future__ import annotations

import time

import torch

from splitserve.transfer import KVManifest, make_receiver, make_sender

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def kv_chunks(num_layers: int, num_kv_heads: int, head_dim: int, num_tokens: int, block_size: int,
              layers_per_chunk: int, dtype: torch.dtype) -> list[tuple[KVManifest, torch.Tensor]]:
    """One prompt's KV as a prefill worker sends it: a chunk per ``layers_per_chunk`` layers."""
    blocks = tuple(range(-(-num_tokens // block_size)))
    chunks = []
    for index, start in enumerate(range(0, num_layers, layers_per_chunk)):
        end = min(start + layers_per_chunk, num_layers)
        manifest = KVManifest("profile", "prefill", "decode", index, start, end, 0, num_tokens, block_size, blocks,
                              num_kv_heads, head_dim, dtype=_DTYPE_NAMES[dtype])
        chunks.append((manifest, torch.randn(manifest.shape).to(dtype)))
    return chunks


def measure_bandwidth(backend: str, chunks: list[tuple[KVManifest, torch.Tensor]], repeats: int,
                      timeout_s: float = 30.0) -> float:
    """Bytes per second of KV (the tensors' bytes, before any codec) through ``backend``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    receiver = make_receiver(backend, lambda manifest, kv: None)
    try:
        with make_sender(backend, receiver.endpoint, timeout_s=timeout_s) as sender:
            for manifest, kv in chunks:  # untimed: the link (a Gloo group, a gRPC channel) is set up here
                sender.send(manifest, kv)
            start = time.perf_counter()
            for _ in range(repeats):
                for manifest, kv in chunks:
                    sender.send(manifest, kv)
            seconds = time.perf_counter() - start
    finally:
        receiver.stop()
    num_bytes = repeats * sum(kv.numel() * kv.element_size() for _, kv in chunks)
    return num_bytes / seconds
