"""Roles: moving elastic workers between the prefill and the decode pool as the load calls for
it -- the pure decision, and the loop that carries it out.

Each request costs the prefill pool its prefill time and the decode pool its share of decode
steps: a decode worker at batch B emits B tokens per step T(B), so a request's o output tokens
take o * T(B) / B seconds of a worker. Over recent requests, W_P = E[prefill seconds] and
W_D = E[output tokens] * T(B) / B. Both pools are equally utilised (lambda * W_P / N_P =
lambda * W_D / N_D, whatever the rate lambda) at N_P* = N * W_P / (W_P + W_D) prefill workers.
``decide`` moves one worker toward N_P* when N_P* is more than ``0.5 + hysteresis`` away from
the current split and the last move is at least ``min_dwell_s`` old, and always keeps one
decode worker. An empty prefill pool is a valid state: every prefill then runs locally on the
decode workers (the placement does that by itself).

``RoleBalancer`` runs ``decide`` (through ``balanced_move``, which the simulator calls too)
every ``interval_s`` on what the router saw (``RoleStats``, fed by the Router on every
finished request) and the cluster's view, and moves the chosen
worker with its ``set_role``: the worker keeps serving what it holds, and the store lists it
under its new role from then on. Moves are logged and counted in the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from splitserve.config import RoleConfig
from splitserve.latency import DecodeStepModel
from splitserve.router.cluster_view import ClusterView

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Move:
    worker_id: str
    to_role: str
    target_prefill_workers: float  # N_P*, for the log


def target_prefill_workers(num_workers: int, prefill_s: float, decode_s: float) -> float:
    """N_P* = N * W_P / (W_P + W_D): the split that loads both pools equally."""
    total = prefill_s + decode_s
    return num_workers * prefill_s / total if total > 0 else 0.0


def decide(prefill_pool: list[str], decode_pool: list[str], prefill_s: float, decode_s: float,
           config: RoleConfig, since_last_move_s: float, least_loaded: Callable[[list[str]], str]) -> Move | None:
    """One move toward the balanced split, or None (balanced within the hysteresis, moved too
    recently, or no work seen yet). ``least_loaded`` picks the worker to move out of a pool."""
    if since_last_move_s < config.min_dwell_s or prefill_s <= 0 or decode_s <= 0:
        return None
    target = target_prefill_workers(len(prefill_pool) + len(decode_pool), prefill_s, decode_s)
    if target > len(prefill_pool) + 0.5 + config.hysteresis and len(decode_pool) > 1:
        return Move(least_loaded(decode_pool), "prefill", target)
    if target < len(prefill_pool) - 0.5 - config.hysteresis and prefill_pool:
        return Move(least_loaded(prefill_pool), "decode", target)
    return None


class RoleStats:
    """Exponential averages over finished requests: predicted prefill seconds and output tokens."""

    def __init__(self, weight: float = 0.05):
        self.weight = weight
        self.prefill_s: float | None = None
        self.output_tokens: float | None = None

    def observe(self, prefill_s: float, num_output_tokens: int) -> None:
        if not 0 < prefill_s < math.inf:
            return
        self.prefill_s = prefill_s if self.prefill_s is None else self.prefill_s + self.weight * (
            prefill_s - self.prefill_s)
        self.output_tokens = num_output_tokens if self.output_tokens is None else self.output_tokens + self.weight * (
            num_output_tokens - self.output_tokens)


def decode_seconds_per_request(output_tokens: float, models: list[DecodeStepModel], batch: float) -> float:
    """E[output tokens] x T(B) / B averaged over the decode pool's models (0 without one)."""
    if not models:
        return 0.0
    b = max(batch, 1.0)
    step = sum(m.predict(round(b), round(b), 0) for m in models) / len(models)
    return output_tokens * step / b


def balanced_move(prefill_pool: list[str], decode_pool: list[str], stats: RoleStats,
                  decode_models: list[DecodeStepModel], running: list[int], config: RoleConfig,
                  since_last_move_s: float, least_loaded: Callable[[list[str]], str]) -> Move | None:
    """``decide`` on what a router saw: ``stats`` of its finished requests, the decode pool's
    models and its workers' reported running requests (their mean is the batch B); None
    before the first finished request or without a decode pool."""
    if stats.prefill_s is None or stats.output_tokens is None or not decode_pool:
        return None
    batch = sum(running) / len(running) if running else 1.0
    decode_s = decode_seconds_per_request(stats.output_tokens, decode_models, batch)
    return decide(prefill_pool, decode_pool, stats.prefill_s, decode_s, config, since_last_move_s, least_loaded)


class RoleBalancer:
    """The loop: read the view, ``decide``, carry out the move (Ray calls ``set_role``)."""

    def __init__(self, view: ClusterView, stats: RoleStats, config: RoleConfig, metrics: Any = None,
                 clock: Callable[[], float] = time.monotonic):
        self.view, self.stats, self.config, self.metrics, self.clock = view, stats, config, metrics, clock
        self._moved_at = clock()  # the starting split gets a full dwell too
        self.num_moves = 0

    def next_move(self) -> Move | None:
        prefill_pool, decode_pool = self.view.members("prefill"), self.view.members("decode")
        models = [m for w in decode_pool if (m := self.view.models_of(w).decode_step) is not None]
        running = [load.num_running_requests for w in decode_pool if (load := self.view.loads.get(w))]
        return balanced_move(prefill_pool, decode_pool, self.stats, models, running, self.config,
                             self.clock() - self._moved_at, lambda pool: self.view.least_loaded_of(pool))

    async def step(self) -> Move | None:
        move = self.next_move()
        if move is None:
            return None
        logger.info("roles: moving %s to the %s pool (balanced split: %.2f prefill workers)", move.worker_id,
                    move.to_role, move.target_prefill_workers)
        await self.view.call(self.view.handle(move.worker_id).set_role.remote(move.to_role), move.worker_id)
        self._moved_at = self.clock()
        self.num_moves += 1
        if self.metrics is not None:
            self.metrics.count_role_change(move.to_role)
        await self.view.refresh(force=True)
        return move

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.step()
            except Exception:  # a worker gone mid-move: the next round sees the new view
                logger.warning("roles: a move failed", exc_info=True)
