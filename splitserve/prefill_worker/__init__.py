"""The prefill worker: runs prompts, streams their KV to decode workers, returns first tokens."""

from splitserve.prefill_worker.worker import PrefillResult, PrefillWorker

__all__ = ["PrefillResult", "PrefillWorker"]
