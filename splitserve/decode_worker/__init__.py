"""The decode worker: reserves blocks, takes KV in, decodes (with speculation), streams tokens."""

from splitserve.decode_worker.worker import DecodeWorker

__all__ = ["DecodeWorker"]
