"""The pool balancer's decision on constructed work estimates: the balanced split, hysteresis,
minimum dwell, and always one decode worker."""

from __future__ import annotations

import pytest

from splitserve.config import RoleConfig
from splitserve.latency import DecodeStepModel
from splitserve.router.roles import Move, RoleStats, decide, decode_seconds_per_request, target_prefill_workers

CONFIG = RoleConfig(min_dwell_s=10.0, hysteresis=0.25)


def first(pool: list[str]) -> str:
    return pool[0]


def test_the_balanced_split_loads_both_pools_equally():
    assert target_prefill_workers(4, prefill_s=1.0, decode_s=3.0) == 1.0
    assert target_prefill_workers(2, prefill_s=0.0, decode_s=3.0) == 0.0


@pytest.mark.parametrize(("prefill_pool", "decode_pool", "prefill_s", "decode_s", "move"), [
    (["p"], ["d"], 0.1, 1.5, Move("p", "decode", 0.125)),  # short prompts, long answers: all decode
    (["p"], ["d"], 1.0, 1.0, None),  # balanced
    ([], ["d1", "d2"], 1.0, 1.0, Move("d1", "prefill", 1.0)),  # 1 is more than 0.5 + 0.25 from 0
    ([], ["d1", "d2", "d3", "d4"], 3.0, 1.0, Move("d1", "prefill", 3.0)),
    (["p"], ["d"], 10.0, 0.1, None),  # prefill-heavy, but the last decode worker stays
    ([], ["d1", "d2"], 0.0, 1.0, None),  # nothing measured yet
])
def test_decide_moves_one_worker_toward_the_balanced_split(prefill_pool, decode_pool, prefill_s, decode_s, move):
    result = decide(prefill_pool, decode_pool, prefill_s, decode_s, CONFIG, since_last_move_s=60.0,
                    least_loaded=first)
    if move is None:
        assert result is None
    else:
        assert result is not None and (result.worker_id, result.to_role) == (move.worker_id, move.to_role)
        assert result.target_prefill_workers == pytest.approx(move.target_prefill_workers)


def test_hysteresis_and_dwell_hold_a_split_near_its_balance():
    # Target 1.2 of 2 workers, 0 in the prefill pool: 1.2 > 0.5 + 0.25 -> move; with hysteresis 1.0, hold.
    assert decide([], ["a", "b"], 1.2, 0.8, CONFIG, 60.0, first) == Move("a", "prefill", pytest.approx(1.2))
    assert decide([], ["a", "b"], 1.2, 0.8, RoleConfig(hysteresis=1.0), 60.0, first) is None
    assert decide([], ["a", "b"], 1.2, 0.8, CONFIG, since_last_move_s=5.0, least_loaded=first) is None


def test_decode_work_per_request_is_its_share_of_batched_steps():
    model = DecodeStepModel.from_coefficients(
        {"const": 0.02, "requests": 0.0, "batched_tokens": 0.005, "context_tokens": 0.0, "draft_tokens": 0.0})
    # Batch 4: a 40 ms step emits 4 tokens; 100 tokens take 100 x 10 ms of a worker.
    assert decode_seconds_per_request(100, [model], batch=4) == pytest.approx(1.0)
    assert decode_seconds_per_request(100, [], batch=4) == 0.0


def test_role_stats_average_finished_requests():
    stats = RoleStats(weight=0.5)
    stats.observe(0.2, 10)
    stats.observe(0.4, 30)
    stats.observe(float("inf"), 1000)  # nothing predicted: ignored
    assert stats.prefill_s == pytest.approx(0.3) and stats.output_tokens == pytest.approx(20)
