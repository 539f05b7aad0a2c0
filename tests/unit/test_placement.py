"""Placement, admission and the speculation controller as pure logic (no Ray)."""

from __future__ import annotations

import math

import pytest

from splitserve.cluster.store import WorkerLoad
from splitserve.errors import CapacityError
from splitserve.router.goodput import DecodeStepModel, PrefillModel
from splitserve.router.placement import Choice, check_slo, prompt_block_hashes, rank_decode, rank_prefill
from splitserve.router.spec_control import SpecController

PREFILL = {"const": 0.02, "tokens": 0.002, "tokens_sq": 0.0}  # 2 ms a token
# Memory-bound decode: a step costs 30 ms plus 1 ms per request and 6 ms per batched token.
DECODE = {"const": 0.03, "requests": 0.001, "batched_tokens": 0.006, "context_tokens": 0.0, "draft_tokens": 0.0}


def load(queued: int = 0, running: int = 0, free: int = 100) -> WorkerLoad:
    return WorkerLoad(queued, running, free, 100)


def test_prefill_goes_where_the_prompt_is_cached():
    ranked = rank_prefill(["a", "b"], 200, {"b": 10}, 16, {"a": load(), "b": load()}, {}, {"a": PREFILL, "b": PREFILL})
    assert [c.worker_id for c in ranked] == ["b", "a"]
    assert ranked[0].predicted_s == pytest.approx(PrefillModel.from_coefficients(PREFILL).predict(200 - 160))


def test_prefill_queue_and_inflight_count():
    ranked = rank_prefill(["a", "b"], 100, {}, 16, {"a": load(queued=500), "b": load()}, {"b": 300},
                          {"a": PREFILL, "b": PREFILL})
    assert [c.worker_id for c in ranked] == ["b", "a"]
    assert ranked[0].predicted_s == pytest.approx(0.02 + 0.002 * 400)


def test_prefill_without_a_model_ranks_last_and_avoid_goes_last():
    ranked = rank_prefill(["a", "b", "c"], 10, {}, 16, {}, {}, {"a": PREFILL, "b": PREFILL}, avoid={"a"})
    assert [c.worker_id for c in ranked] == ["b", "c", "a"]
    assert math.isinf(ranked[1].predicted_s)


def test_decode_skips_full_workers_and_prefers_the_smaller_batch():
    loads = {"a": load(running=8), "b": load(running=2), "full": load(free=1)}
    models = {w: DECODE for w in loads}
    ranked = rank_decode(["a", "b", "full"], 40, 16, loads, {}, models)
    assert [c.worker_id for c in ranked] == ["b", "a", "full"]
    assert ranked[0].predicted_s == pytest.approx(DecodeStepModel.from_coefficients(DECODE).predict(3, 3, 120, 0))


@pytest.mark.parametrize(("predicted", "slo", "refused"), [(0.5, 0.49, True), (0.5, 0.5, False), (0.5, None, False),
                                                            (math.inf, 0.1, False)])
def test_admission_refuses_exactly_when_the_prediction_exceeds_the_slo(predicted, slo, refused):
    if refused:
        with pytest.raises(CapacityError, match="exceeds the request's SLO"):
            check_slo("prefill", Choice("a", predicted), slo)
    else:
        check_slo("prefill", Choice("a", predicted), slo)


def test_block_hashes_match_the_prefix_index_chain():
    hashes = prompt_block_hashes(list(range(40)), 16)
    assert len(hashes) == 2 and hashes[0] != hashes[1]
    assert prompt_block_hashes(list(range(32)) + [999] * 8, 16) == hashes


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def feed(controller: SpecController, worker: str, rids: list[str], rate: float, steps: int, clock: Clock) -> dict:
    """Every request drafts 4 per step and gets ``rate`` of them accepted; returns the last k push."""
    changed: dict[str, int] = {}
    for step in range(1, steps + 1):
        clock.t += 1.0
        for rid in rids:
            drafted = 4 * step
            changed |= controller.observe(worker, rid, 1, drafted, int(rate * drafted), 8, DECODE)
    return changed


def test_controller_speculates_at_small_batch_and_backs_off_as_the_batch_grows():
    clock = Clock()
    small = SpecController(clock=clock)
    small.add("d", "r0", 20, 0, None)
    feed(small, "d", ["r0"], 0.9, 6, clock)
    assert small.k_of("d", "r0") >= 3

    large = SpecController(clock=clock)
    rids = [f"r{i}" for i in range(64)]
    for rid in rids:
        large.add("d", rid, 20, 4, None)
    feed(large, "d", rids, 0.9, 6, clock)
    assert max(large.k_of("d", r) for r in rids) < small.k_of("d", "r0")


def test_controller_lowers_k_for_a_request_whose_drafts_are_rejected():
    clock = Clock()
    controller = SpecController(clock=clock)
    controller.add("d", "good", 20, 2, None)
    controller.add("d", "bad", 20, 2, None)
    for step in range(1, 8):
        clock.t += 1.0
        controller.observe("d", "good", 1, 4 * step, 4 * step, 8, DECODE)
        controller.observe("d", "bad", 1, 4 * step, 0, 8, DECODE)
    assert controller.k_of("d", "bad") == 0
    assert controller.k_of("d", "good") > 0


def test_pinned_requests_are_never_changed_and_removal_forgets():
    clock = Clock()
    controller = SpecController(clock=clock)
    controller.add("d", "pinned", 20, 0, 0)
    changed = feed(controller, "d", ["pinned"], 1.0, 5, clock)
    assert "pinned" not in changed and controller.k_of("d", "pinned") == 0
    controller.remove("d", "pinned")
    assert controller.k_of("d", "pinned") is None
    assert controller.observe("d", "pinned", 1, 4, 4, 8, DECODE) == {}


def test_a_new_request_starts_at_the_k_its_worker_batch_would_give_it():
    clock = Clock()
    idle, busy = SpecController(clock=clock), SpecController(clock=clock)
    assert idle.initial_k("d", "new", 20, 8, None) is None  # no fitted model: the worker's default
    assert idle.initial_k("d", "new", 20, 0, DECODE) is None  # no speculation on that worker
    for i in range(64):
        busy.add("d", f"r{i}", 20, 0, None)
    alone, crowded = idle.initial_k("d", "new", 20, 8, DECODE), busy.initial_k("d", "new", 20, 8, DECODE)
    assert alone is not None and crowded is not None and alone > crowded
    assert busy.k_of("d", "new") is None  # asking does not add the request
    # Requests still in prefill for that worker count as batch members like the newcomer.
    assert idle.initial_k("d", "new", 20, 8, DECODE, num_in_flight=64) == crowded
