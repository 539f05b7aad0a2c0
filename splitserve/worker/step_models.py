"""StepModels: the latency models a worker fits from its own steps and publishes for routers.

The engine thread records each step's ``StepStats``; the heartbeat thread folds them into the
models and takes their coefficients (splitserve.latency) to publish. Which steps feed which model:
a prefill-role worker fits ``PrefillModel`` on every step that ran prompt tokens (what queued
prompts will cost); a decode-role worker fits ``DecodeStepModel`` on decode and verification
steps only -- a step carrying a prefill chunk is compute-bound per token, a different regime
that would skew the marginal cost of a draft; a worker that takes prompts into its decode batch
fits ``MixedStepModel`` on every step, so it predicts a step with and without a prompt chunk.
"""

from __future__ import annotations

from collections import deque

from splitserve.engine.engine import StepStats
from splitserve.latency import DecodeStepModel, MixedStepModel, PrefillModel


class StepModels:
    def __init__(self, fits_prefill: bool, fits_decode: bool, fits_mixed: bool = False):
        self.prefill = PrefillModel() if fits_prefill else None
        self.decode_step = DecodeStepModel() if fits_decode else None
        self.mixed_step = MixedStepModel() if fits_mixed else None
        self._pending: deque[StepStats] = deque(maxlen=8192)

    def record(self, stats: StepStats) -> None:
        """Keep a step for the next fit (engine thread; cheap)."""
        self._pending.append(stats)

    def refit(self) -> dict[str, dict[str, float]]:
        """Fold the recorded steps in, refit, and return each model's coefficients by name."""
        while self._pending:
            self._add(self._pending.popleft())
        return {model.NAME: model.to_coefficients() for model in (self.prefill, self.decode_step, self.mixed_step)
                if model is not None}

    def _add(self, stats: StepStats) -> None:
        if self.prefill is not None and stats.num_batched_tokens:
            self.prefill.add(stats.num_batched_tokens, stats.step_time)
        is_decode = stats.num_batched_tokens == stats.num_requests + stats.num_draft_tokens
        if self.decode_step is not None and is_decode:
            self.decode_step.add_step(stats)
        if self.mixed_step is not None:
            self.mixed_step.add_step(stats)
