"""The prefill worker: runs prompts, streams their KV to decode workers, returns first tokens."""

from splitserve.prefill_worker.worker import PrefillWorker

__all__ = ["PrefillWorker"]
