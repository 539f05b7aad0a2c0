"""The compiled forward: each decoder layer's work around attention under ``torch.compile``.

``compile_runner`` gives a ModelRunner compiled ``LayerStages`` (splitserve.engine.model) and
runs a few steps of different sizes through them, so the compile cost is paid when the engine
starts, not by its first requests. Compiled are the part of a layer before attention (input
norm, QKV projection, RoPE) and the part after it (o-proj and residual, post norm, SwiGLU MLP
and residual): there the elementwise work fuses around the GEMMs. The paged attention stays
eager: it gathers KV blocks by each step's block tables, shapes that change with every batch.
The projections enter the graphs as one custom op each (splitserve.engine.linear).

The token dimension is dynamic, so continuous batching's changing token counts reuse one graph
per stage (a one-token step gets its own: torch specializes size 1). The same code runs on any
device. If compiling or the warm-up raises, the runner keeps the eager stages and a warning
says why; if a compiled stage raises later (a step size that will not compile, a backend
error), that call runs again eagerly (the stages are pure functions), the runner turns eager for
good and a warning says why: a request never fails for the compiler. It knows nothing of
requests, the scheduler or the KV blocks' owners: the warm-up writes K/V into the first blocks,
so it runs before any request holds them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from splitserve.engine.linear import INT8_MM_MAX_ROWS
from splitserve.engine.model import EAGER_STAGES, LayerStages, after_attention, before_attention
from splitserve.engine.runner import BatchItem, ModelRunner

log = logging.getLogger(__name__)


def compile_stages() -> LayerStages:
    """Both halves of a layer compiled, their token dimension dynamic (compiled on first call)."""
    return LayerStages(_token_dynamic(before_attention), _token_dynamic(after_attention))


def warm_up_token_counts(max_num_batched_tokens: int, max_tokens: int) -> list[int]:
    """Step sizes the warm-up runs: a decode (1 token: its own graph), a step on each side of the
    int8 projections' kernel switch (INT8_MM_MAX_ROWS: a guard, so a graph each) and a full step."""
    largest = min(max_num_batched_tokens, max_tokens)
    return sorted({min(n, largest) for n in (1, INT8_MM_MAX_ROWS, 64, largest)})


def compile_runner(runner: ModelRunner, token_counts: Sequence[int]) -> float:
    """Compile ``runner``'s layer stages and warm them up over ``token_counts``; the seconds it
    took. On any failure the runner is left eager (``runner.stages is EAGER_STAGES``) and a
    warning says why; the seconds are then the time lost."""
    start = time.perf_counter()
    try:
        runner.stages = compile_stages()
        for num_tokens in token_counts:
            _run_step(runner, num_tokens)
    except Exception as error:  # noqa: BLE001 -- torch.compile fails in many types; eager still serves
        runner.stages = EAGER_STAGES
        seconds = time.perf_counter() - start
        reason = (str(error).strip().splitlines() or [""])[0]
        log.warning("the compiled forward failed after %.1f s, so the engine runs eager: %s: %s",
                    seconds, type(error).__name__, reason)
        return seconds
    seconds = time.perf_counter() - start
    runner.stages = falling_back(runner, runner.stages)
    log.info("compiled the forward in %.1f s (warm-up steps of %s tokens)", seconds,
             ", ".join(map(str, token_counts)))
    return seconds


def falling_back(runner: ModelRunner, stages: LayerStages) -> LayerStages:
    """``stages`` guarded: the first call that raises runs again eagerly, and the runner turns
    eager for good (``runner.stages = EAGER_STAGES``; the rest of that step's layers too), with
    a warning that says why."""

    def guard(compiled_stage: Callable[..., Any], eager_stage: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(eager_stage)
        def run(*args: Any) -> Any:
            if runner.stages is EAGER_STAGES:  # the other stage failed earlier in this step
                return eager_stage(*args)
            try:
                return compiled_stage(*args)
            except Exception as error:  # noqa: BLE001 -- as compile_runner's: eager still serves
                runner.stages = EAGER_STAGES
                tokens = next((a.shape[0] for a in args if isinstance(a, torch.Tensor)), "?")
                reason = (str(error).strip().splitlines() or [""])[0]
                log.warning("the compiled %s failed on a step of %s tokens, so the engine runs eager from now on: "
                            "%s: %s", eager_stage.__name__, tokens, type(error).__name__, reason)
                return eager_stage(*args)

        return run

    return LayerStages(guard(stages.before_attention, before_attention), guard(stages.after_attention, after_attention))


def _run_step(runner: ModelRunner, num_tokens: int) -> None:
    """One forward of a ``num_tokens``-token prompt in the first blocks of the cache."""
    num_blocks = -(-num_tokens // runner.block_size)
    runner.execute([BatchItem([0] * num_tokens, 0, list(range(num_blocks)), num_logits=1)])


def _token_dynamic(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled, with dimension 0 of every tensor argument (the step's tokens) dynamic."""
    compiled = torch.compile(fn)

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        for arg in args:
            if isinstance(arg, torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(arg, 0)
        return compiled(*args)

    return run
