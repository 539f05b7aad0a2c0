"""Measuring a ``splitserve.profile/1`` latency profile of this engine on this machine.

``measure_profile`` builds the engine a worker would build (``ProfileConfig.engine``), runs the
designed grid of step shapes on it (grid.py) and feeds every timed step (at its work class's
median within its shape) into the workers' own
``StepModels`` (splitserve.worker.step_models: the same routing of steps to models, the same
fits), so the coefficients are what a worker would publish after seeing those steps. To them it
adds the KV cache's capacity in tokens (the engine's block pool for its ``kv_cache_bytes``),
the KV bytes per token and the KV transfer bandwidth of each backend (bandwidth.py). The result
is a JSON-ready dict in the format ``splitserve.sim.profile_files.load_profile`` reads
(docs/simulator.md); ``fit_rows`` gives the table ``splitserve profile`` prints.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from splitserve.config import ProfileConfig, TransferConfig, field_default
from splitserve.engine.engine import LLMEngine, LoadedModel
from splitserve.profiler.bandwidth import kv_chunks, measure_bandwidth
from splitserve.profiler.grid import GridRunner, make_grid
from splitserve.sim.profile_files import SPLITSERVE_SCHEMA
from splitserve.worker.step_models import StepModels

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
QUALITY_KEYS = ("r2", "rmse", "n")


def measure_profile(config: ProfileConfig, loaded: LoadedModel | None = None,
                    progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run the grid and the transfers; the profile as a dict (see the module docstring).
    ``loaded``: the model already in memory (None: load ``config.engine.model``)."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    started = time.perf_counter()
    engine = LLMEngine(config.engine, loaded=loaded or LoadedModel.load(config.engine))
    spec = config.engine.speculative
    grid = make_grid(config.max_tokens, config.max_batch, config.engine.max_num_batched_tokens,
                     config.engine.max_num_seqs, spec.max_speculative_tokens if spec is not None else 0)
    models = StepModels(fits_prefill=True, fits_decode=True, fits_mixed=True)  # as Worker does
    steps: list[object] = []

    def record(stats: Any) -> None:
        steps.append(stats)
        models.record(stats)

    GridRunner(engine, record, config.repeats).run(grid, progress)
    fitted = models.refit()
    kv_bytes_per_token = engine.model_config.kv_bytes_per_token(config.engine.torch_dtype.itemsize)
    profile: dict[str, Any] = {
        "schema": SPLITSERVE_SCHEMA,
        "model": model_name(config.engine.model),
        "device": device_name(),
        "tp": {"1": {"kv_capacity_tokens": engine.block_pool.num_blocks * config.engine.block_size, **fitted}},
    }
    if config.transfer_backends:
        progress(f"KV transfer: {', '.join(config.transfer_backends)}")
        bandwidths = transfer_bandwidths(engine, config)
        profile |= {"kv_bytes_per_token": kv_bytes_per_token,
                    "kv_transfer_bytes_per_s": bandwidths[config.transfer_backend],
                    "kv_transfer_backend": config.transfer_backend,
                    "kv_transfer_bytes_per_s_by_backend": bandwidths}
    profile["measured"] = {
        "engine": {"dtype": config.engine.dtype, "quantization": config.engine.quantization,
                   "enforce_eager": config.engine.enforce_eager,
                   "block_size": config.engine.block_size,
                   "kv_cache_bytes": config.engine.kv_cache_bytes,
                   "max_num_batched_tokens": config.engine.max_num_batched_tokens,
                   "speculative": spec.proposer if spec is not None else None},
        "threads": torch.get_num_threads(), "repeats": config.repeats,
        "step_time": "median per shape and work class", "max_tokens": config.max_tokens,
        "max_batch": config.max_batch, "num_shapes": grid.num_shapes, "num_steps": len(steps),
        "transfer_tokens": config.transfer_tokens, "seconds": round(time.perf_counter() - started, 3),
    }
    check_finite(profile)
    return profile


def transfer_bandwidths(engine: LLMEngine, config: ProfileConfig) -> dict[str, float]:
    """Bytes/s of each measured backend, sending a ``transfer_tokens``-token prompt's KV."""
    model = engine.model_config
    chunks = kv_chunks(model.num_layers, model.num_kv_heads, model.head_dim, config.transfer_tokens,
                       config.engine.block_size, field_default(TransferConfig, "layers_per_chunk"),
                       config.engine.torch_dtype)
    return {backend: measure_bandwidth(backend, chunks, config.repeats) for backend in config.transfer_backends}


def model_name(model: str | None) -> str:
    """The profile's model name: the default model's, or the file's or folder's name."""
    return DEFAULT_MODEL_NAME if model is None else Path(model).stem or str(model)


def device_name() -> str:
    """E.g. 'cpu x86_64, 2 threads' (the profile says where it was measured)."""
    return f"cpu {platform.machine() or 'unknown'}, {torch.get_num_threads()} threads"


def check_finite(profile: dict[str, Any]) -> None:
    """Every coefficient and quality number is a finite number (JSON has no NaN)."""
    for tp, entry in profile["tp"].items():
        for name, values in entry.items():
            if isinstance(values, dict):
                bad = {k: v for k, v in values.items() if not math.isfinite(v)}
                assert not bad, f"tp {tp} {name}: non-finite fit values {bad}"


def fit_rows(profile: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(model, n, r2, rmse ms, coefficients) per fitted model of each TP degree."""
    rows = []
    for tp, entry in sorted(profile["tp"].items()):
        for name, values in entry.items():
            if not isinstance(values, dict):
                continue
            coefficients = ", ".join(f"{k}={v:.3g}" for k, v in values.items() if k not in QUALITY_KEYS)
            rows.append((f"tp{tp} {name}", f"{values['n']:.0f}", f"{values['r2']:.3f}",
                         f"{values['rmse'] * 1e3:.2f}", coefficients))
    return rows
