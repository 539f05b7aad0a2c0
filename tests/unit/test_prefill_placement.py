"""Elastic prefill placement on constructed latency models: the decision rules as specified
(local when the prefill pool would miss the TTFT SLO and local chunks keep the running
requests within TPOT; remote when local chunks would push them past it; refusal when neither
holds), the chunk size, the amortized TPOT guard (slack banked, horizons), the cost that
breaks ties, margins and correction factors."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from splitserve.cluster.embedded_store import MemoryStore
from splitserve.cluster.store import WorkerInfo, WorkerLoad
from splitserve.config import PlacementConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import CapacityError
from splitserve.latency import DecodeStepModel, MixedStepModel, PrefillModel
from splitserve.protocol import SLO
from splitserve.router.cluster_view import ClusterView
from splitserve.router.goodput import SpecRequest, choose_k
from splitserve.router.handoff import RoutedRequest
from splitserve.router.placer import Placer
from splitserve.router.prefill_placement import (
    LOCAL,
    REMOTE,
    TTFT,
    Corrections,
    LocalSide,
    Remote,
    Running,
    local_option,
    place,
)
from splitserve.router.spec_control import SpecController

# A decode step costs 20 ms + 3 ms per decoding request; a prefill chunk adds 1 ms and 1 ms per token.
COEFFICIENTS = {"const": 0.02, "requests": 0.001, "decode_tokens": 0.002, "draft_tokens": 0.0,
                "prefill_tokens": 0.001, "prefill_attention": 0.0, "context_tokens": 0.0}
MIXED = MixedStepModel.from_coefficients(COEFFICIENTS)
EXACT = PlacementConfig(margin_sigmas=0.0)
PROMPT = 200


def side(num_decoding: int = 4, tpot_slo_s: float = 0.1, model=MIXED, running=None, num_draft_tokens: int = 0,
         **kwargs) -> LocalSide:
    """A decode worker whose ``num_decoding`` requests just started (by default)."""
    running = (Running(tpot_slo_s),) * num_decoding if running is None else running
    return LocalSide("d", model, num_decoding, num_draft_tokens, context_tokens=0, running=running, **kwargs)


def test_the_fastest_local_prefill_the_running_requests_absorb_is_used():
    # With 4 decoding (32 ms steps, 35 ms with the newcomer): just started, each can absorb
    # 100 - 35 = 65 ms per step of the prefill. One 200-token step adds 201 ms, two 128-token
    # steps 202 ms over 2 steps; four 64-token steps add 204 ms over 4 -- the first that fits.
    option = local_option(side(), PROMPT, EXACT)
    assert option is not None and option.kind == LOCAL and option.chunk_tokens == 64
    assert option.predicted_ttft_s == pytest.approx(4 * 0.033 + 0.2)  # chunks 64, 64, 64, 8
    assert option.extra_decode_s == pytest.approx(4 * 0.001 + 0.2)
    assert option.predicted_tpot_s == pytest.approx(0.02 + 0.003 * 5)
    # Nobody decoding: nothing to protect, the whole prompt in one step.
    alone = local_option(side(num_decoding=0), PROMPT, EXACT)
    assert alone is not None and alone.chunk_tokens == PROMPT and alone.predicted_ttft_s == pytest.approx(0.221)


def test_local_when_the_prefill_pool_would_miss_the_ttft_slo():
    busy = Remote("p", "d", ttft_s=2.0, tpot_s=0.035)
    chosen = place(PROMPT, SLO(ttft_s=1.0, tpot_s=0.1), busy, [side()], EXACT)
    assert (chosen.kind, chosen.decode_worker, chosen.chunk_tokens) == (LOCAL, "d", 64)


def test_remote_when_local_chunks_would_push_running_requests_past_their_tpot():
    # Even 32-token chunks add 207 ms over 7 steps; the running requests allow 5 ms a step.
    assert local_option(side(tpot_slo_s=0.04), PROMPT, EXACT) is None
    chosen = place(PROMPT, SLO(ttft_s=1.0, tpot_s=0.1), Remote("p", "d", 0.5, 0.035),
                   [side(tpot_slo_s=0.04)], EXACT)
    assert (chosen.kind, chosen.prefill_worker, chosen.decode_worker) == (REMOTE, "p", "d")


def test_slack_a_running_request_banked_or_is_sure_to_have_pays_for_larger_chunks():
    # 50 tokens in 1.75 s under a 100 ms SLO: 3.25 s banked, enough for the whole prompt at once.
    ahead = Running(0.1, num_tokens=50, decode_s=1.75)
    assert local_option(side(running=(ahead,) * 4), PROMPT, EXACT).chunk_tokens == PROMPT
    # Just started, but sure to produce 100 more tokens (ignore_eos): 65 ms x 100 to spread it over.
    long = Running(0.1, tokens_left=100)
    assert local_option(side(running=(long,) * 4), PROMPT, EXACT).chunk_tokens == PROMPT
    # The tightest running request decides: one just started without a horizon keeps chunks at 64.
    assert local_option(side(running=(ahead, long, Running(0.1))), PROMPT, EXACT).chunk_tokens == 64
    # One about to finish bears only the steps it is still there for: its 1 token takes 1/4 of
    # the 64-token plan's 204 ms (51 ms), within its 65 ms; a 128-token chunk's half (101 ms) is not.
    assert local_option(side(running=(Running(0.1, tokens_left=1),)), PROMPT, EXACT).chunk_tokens == 64


def test_a_running_request_that_misses_its_slo_anyway_does_not_veto():
    behind = Running(0.04, num_tokens=10, decode_s=1.0)  # 0.4 s allowed, 1.0 s taken: lost already
    assert behind.slack_s(token_s=0.035, horizon=7) < 0
    assert local_option(side(running=(behind,)), PROMPT, EXACT).chunk_tokens == PROMPT
    assert local_option(side(running=(behind, Running(0.04))), PROMPT, EXACT) is None


def test_refused_when_neither_holds_with_a_hint_of_when_to_retry():
    with pytest.raises(CapacityError, match="predicted TTFT 2000 ms .* exceeds the request's SLO of 1000 ms") as e:
        place(PROMPT, SLO(ttft_s=1.0, tpot_s=0.1), Remote("p", "d", 2.0, 0.035), [side(tpot_slo_s=0.04)],
              EXACT)
    assert e.value.retry_after_s == pytest.approx(1.0)  # the queue ahead must drain by the excess
    with pytest.raises(CapacityError, match="past their TPOT SLO") as e:
        place(PROMPT, SLO(ttft_s=1.0), None, [side(tpot_slo_s=0.04)], EXACT)
    assert e.value.retry_after_s == 1.0
    with pytest.raises(CapacityError, match="predicted TPOT") as e:  # the newcomer's own TPOT, either way
        place(PROMPT, SLO(tpot_s=0.01), Remote("p", "d", 0.3, 0.035), [side()], EXACT)
    assert e.value.retry_after_s == pytest.approx(0.3)  # its predicted TTFT


@pytest.mark.parametrize(("ttft", "slo", "refused"), [(0.5, 0.49, True), (0.5, 0.5, False), (0.5, None, False),
                                                      (float("inf"), 0.1, False)])
def test_admission_refuses_exactly_when_the_prediction_exceeds_the_slo(ttft, slo, refused):
    remote = Remote("p", "d", ttft, 0.035)
    if refused:
        with pytest.raises(CapacityError, match="exceeds the request's SLO"):
            place(PROMPT, SLO(ttft_s=slo), remote, [], EXACT)
    else:
        assert place(PROMPT, SLO(ttft_s=slo), remote, [], EXACT).kind == REMOTE


def test_among_options_that_hold_the_one_that_delays_others_least_wins():
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    remote = Remote("p", "d", ttft_s=0.3, tpot_s=0.035)
    # Four requests decoding would each wait ~0.2 s for a local prefill: remote is cheaper.
    assert place(PROMPT, slo, remote, [side()], EXACT).kind == REMOTE
    # An idle decode worker prefills it sooner than the prefill worker, delaying nobody.
    assert place(PROMPT, slo, remote, [side(num_decoding=0)], EXACT).kind == LOCAL
    # The prefill pool's queue outgrows the delay local chunks cause (0.332 s + 4 x 0.204 s).
    loose = SLO(ttft_s=2.0, tpot_s=0.1)
    assert place(PROMPT, loose, Remote("p", "d", 1.1, 0.035), [side()], EXACT).kind == REMOTE
    assert place(PROMPT, loose, Remote("p", "d", 1.2, 0.035), [side()], EXACT).kind == LOCAL


def test_queued_prefill_and_cached_tokens_count_at_the_decode_worker():
    queued = local_option(side(num_decoding=0, queued_prefill_tokens=300), PROMPT, EXACT)
    cached = local_option(side(num_decoding=0, cached_tokens=160), PROMPT, EXACT)
    assert queued is not None and queued.predicted_ttft_s == pytest.approx(0.021 + 0.5)  # 500 tokens in one step
    assert cached is not None and cached.predicted_ttft_s == pytest.approx(0.021 + 0.04)  # 40 uncached tokens


def test_corrections_and_the_fit_error_margin_scale_predictions():
    slow = local_option(side(num_decoding=0, ttft_correction=2.0), PROMPT, EXACT)
    assert slow is not None and slow.predicted_ttft_s == pytest.approx(2 * 0.221)
    noisy = MixedStepModel.from_coefficients({**COEFFICIENTS, "rmse": 0.01, "n": 100})
    margin = local_option(side(num_decoding=0, model=noisy), PROMPT, PlacementConfig(margin_sigmas=2.0))
    assert margin is not None and margin.predicted_ttft_s == pytest.approx(0.221 + 0.02)  # one step, 2 sigma
    assert local_option(side(model=None), PROMPT, EXACT) is None  # no model yet: no local option


def test_a_correction_follows_observed_over_predicted_within_bounds():
    corrections = Corrections(weight=0.5, bounds=(0.5, 4.0))
    assert corrections.factor("w", "ttft") == 1.0
    corrections.observe("w", "ttft", predicted_s=0.1, actual_s=0.2)  # twice as slow as predicted
    assert corrections.factor("w", "ttft") == pytest.approx(1.5)
    for _ in range(50):  # predictions made with the factor that match: it stays
        corrections.observe("w", "ttft", predicted_s=0.3, actual_s=0.3)
    assert corrections.factor("w", "ttft") == pytest.approx(1.5)
    for _ in range(50):
        corrections.observe("w", "ttft", predicted_s=0.1, actual_s=10.0)
    assert corrections.factor("w", "ttft") == 4.0 and corrections.factor("w", "tpot") == 1.0
    corrections.observe("w", "tpot", predicted_s=float("inf"), actual_s=1.0)  # nothing predicted: ignored
    assert corrections.factor("w", "tpot") == 1.0


def test_the_tail_of_observed_over_predicted_raises_the_guard_not_the_prediction():
    corrections = Corrections(weight=0.2, bounds=(0.5, 4.0), tail_quantile=0.9, tail_window=10, tail_min=5)
    for _ in range(4):
        corrections.observe("w", "tpot", predicted_s=0.1, actual_s=0.1)
    assert corrections.tail("w", "tpot") == 1.0  # too few requests to tell a tail
    for actual in (0.1, 0.1, 0.1, 0.1, 0.15, 0.15):  # of the last 10, a fifth 1.5x slower than predicted
        corrections.observe("w", "tpot", predicted_s=0.1, actual_s=actual)
    assert corrections.tail("w", "tpot") == pytest.approx(corrections.factor("w", "tpot") * 1.5)
    for _ in range(10):  # faster than predicted: the tail never lowers the factor
        corrections.observe("w", "tpot", predicted_s=0.1, actual_s=0.05)
    assert corrections.tail("w", "tpot") == corrections.factor("w", "tpot")
    corrections.observe("w", "tpot", predicted_s=0.1, actual_s=10.0)
    assert corrections.tail("w", "tpot") <= 4.0
    # The guard protects with the tail: 64-token chunks add 204 ms x 1.5 over 4 steps, more than
    # the 100 - 52.5 ms a step its requests can spare; 32-token ones 207 ms x 1.5 over 7 fit.
    # What is predicted for the newcomer (and learnt from) stays the mean.
    option = local_option(side(tpot_tail=1.5), PROMPT, EXACT)
    assert option.chunk_tokens == 32 and option.predicted_tpot_s == pytest.approx(0.035)
    assert option.extra_decode_s == pytest.approx(6 * 0.033 + 0.009)


def test_without_admission_the_cheapest_option_is_taken_when_none_holds():
    open_door = PlacementConfig(margin_sigmas=0.0, admission=False)
    slo = SLO(ttft_s=1.0, tpot_s=0.01)
    chosen = place(PROMPT, slo, Remote("p", "d", 2.0, 0.035), [side(tpot_slo_s=0.04)], open_door)
    assert chosen.kind == REMOTE  # the only option; it misses, and is taken all the same
    # No prefill pool and no chunk within the running requests' TPOT: the smallest chunk.
    chosen = place(PROMPT, SLO(ttft_s=1.0), None, [side(tpot_slo_s=0.04)], open_door)
    assert (chosen.kind, chosen.chunk_tokens) == (LOCAL, 32)
    # Options that hold still win over those that do not.
    assert place(PROMPT, SLO(ttft_s=1.0, tpot_s=0.1), Remote("p", "d", 2.0, 0.035), [side()], open_door).kind == LOCAL


def test_without_admission_a_hand_off_its_prefill_worker_s_requests_cannot_absorb_comes_last():
    open_door = PlacementConfig(margin_sigmas=0.0, admission=False)
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    # The cheapest by far (0.1 s): but its prefill worker's requests absorb none of its chunks,
    # and a local prefill holds. The local one wins; were the hand-off's chunks absorbed, it would.
    unguarded = Remote("p", "d", 0.1, 0.035, chunk_tokens=32, extra_decode_s=0.5, extra_steps=7,
                       delay_cost_s=0.0, guarded=False)
    assert place(PROMPT, slo, unguarded, [side()], open_door).kind == LOCAL
    assert place(PROMPT, slo, replace(unguarded, guarded=True), [side()], open_door).kind == REMOTE
    unguarded = replace(unguarded, delay_cost_s=2.0)
    # Nothing holds: the hand-off's smallest chunks and the local ones are weighed alike, each
    # with the delay it imposes (here the hand-off's 2 s are dearer than the local chunks').
    strained = side(tpot_slo_s=0.04)
    local_fallback = local_option(strained, PROMPT, open_door, protect=False)
    assert local_fallback.cost_s < 0.1 + 2.0
    assert place(PROMPT, SLO(ttft_s=1.0), unguarded, [strained], open_door).kind == LOCAL
    assert place(PROMPT, SLO(ttft_s=1.0), replace(unguarded, delay_cost_s=0.0), [strained], open_door).kind == REMOTE


def test_the_placer_sees_each_running_request_against_its_slo_and_strangers_as_just_started():
    now = [100.0]
    placer = Placer(ClusterView(MemoryStore(), get_actor=lambda name: None), SpecController(), 16,
                    EXACT, default_slo=SLO(tpot_s=0.05), clock=lambda: now[0])
    placer.decoding("d", "sure", SLO(tpot_s=0.1), SamplingParams(max_tokens=64, ignore_eos=True))
    placer.decoding("d", "eos", SLO(tpot_s=0.2), SamplingParams(max_tokens=64))
    placer.decoding("d", "free", SLO(), SamplingParams())  # no TPOT SLO: nothing to protect
    now[0] += 1.5
    placer.streamed("d", "sure", 21)
    placer.streamed("d", "eos", 11)
    assert placer.running_at("d", num_decoding=5) == (
        Running(0.1, num_tokens=20, decode_s=1.5, tokens_left=43, request_id="sure"),
        Running(0.2, num_tokens=10, decode_s=1.5, request_id="eos"),
        Running(0.05), Running(0.05))  # two requests another router runs there
    placer.done("d", "sure")
    assert len(placer.running_at("d", num_decoding=2)) == 1


def test_an_idle_prefill_pool_worker_may_run_a_request_end_to_end_in_elastic_mode():
    store = MemoryStore()
    prefill = {"const": 0.02, "tokens": 0.001, "tokens_sq": 0.0}
    decode = {"const": 0.02, "requests": 0.001, "batched_tokens": 0.002, "context_tokens": 0.0, "draft_tokens": 0.0}
    for worker_id, kind, running in (("p", "prefill", 0), ("d", "decode", 4)):
        store.register_worker(WorkerInfo(worker_id, kind, worker_id, "", "node"), 60.0)
        store.report(worker_id, 60.0, WorkerLoad(0, running, 100, 100),
                     {PrefillModel.NAME: prefill, DecodeStepModel.NAME: decode, MixedStepModel.NAME: COEFFICIENTS})
    view = ClusterView(store, get_actor=lambda name: None)
    placer = Placer(view, SpecController(), 16, EXACT, default_slo=SLO(tpot_s=0.1))
    placer.transfer_s = 0.05  # the hand-off's exposed wait
    asyncio.run(view.refresh(force=True))

    def placed(local: bool):
        req = RoutedRequest(f"r{local}", list(range(PROMPT)), SamplingParams(), SLO(ttft_s=1.0, tpot_s=0.1), 0.0)
        return asyncio.run(placer.place(req, local=local))

    # p is idle: it prefills and decodes the request itself (221 ms, nobody delayed) rather than
    # hand it to the busy d (220 ms + 50 ms of transfer) or prefill it inside d's batch.
    chosen = placed(local=True)
    assert (chosen.kind, chosen.prefill_worker, chosen.decode_worker) == (LOCAL, "p", "p")
    assert view.inflight_tokens["p"] == PROMPT  # counted as queued at p until its first token
    # Disaggregated: always the hand-off.
    assert placed(local=False).kind == REMOTE


def test_a_pending_request_bears_only_the_prefills_placed_after_it_and_what_they_promised():
    # 1000 prompt tokens queued at an idle worker, and a request placed there that is sure to
    # decode 10 tokens (77 ms of slack each under a 100 ms SLO, 770 ms in all).
    queued = dict(num_decoding=0, queued_prefill_tokens=1000)
    # Decoding already, it bears the whole queue: only 64-token chunks spread the 1.2 s thin enough.
    decoding = Running(0.1, tokens_left=10)
    assert local_option(side(running=(decoding,), **queued), PROMPT, EXACT).chunk_tokens == 64
    # Pending, it decodes after the queue: this prompt's one 201 ms step is all it bears.
    pending = Running(0.1, tokens_left=10, pending=True)
    option = local_option(side(running=(pending,), **queued), PROMPT, EXACT)
    assert option.chunk_tokens == 512 and (option.extra_decode_s, option.extra_steps) == (pytest.approx(0.201), 1)
    # What earlier placements promised it counts. Without a horizon it absorbs 77 ms a step:
    # 64-token chunks (204 ms over 4 steps) alone, 32-token ones beside a 400 ms promise over 3.
    assert local_option(side(running=(Running(0.1, pending=True),), **queued), PROMPT, EXACT).chunk_tokens == 64
    promised = Running(0.1, pending=True, promised_s=0.4, promised_steps=3)
    assert local_option(side(running=(promised,), **queued), PROMPT, EXACT).chunk_tokens == 32


def test_the_placer_protects_a_burst_s_earlier_requests_before_their_first_token():
    store = MemoryStore()
    store.register_worker(WorkerInfo("d", "decode", "d", "", "node"), 60.0)
    store.report("d", 60.0, WorkerLoad(0, 0, 100, 100), {MixedStepModel.NAME: COEFFICIENTS})
    view = ClusterView(store, get_actor=lambda name: None)
    placer = Placer(view, SpecController(), 16, EXACT, default_slo=SLO(), clock=lambda: 0.0)
    asyncio.run(view.refresh(force=True))

    def placed(request_id: str):
        req = RoutedRequest(request_id, list(range(PROMPT)), SamplingParams(), SLO(tpot_s=0.1), 0.0)
        return asyncio.run(placer.place(req))

    first = placed("r1")
    assert (first.kind, first.chunk_tokens) == (LOCAL, PROMPT)  # nobody to protect: one step
    assert placer.running_at("d", num_decoding=0) == (Running(0.1, pending=True),)
    second = placed("r2")  # r1 is pending there: 77 ms a step to spare, so 64-token chunks
    assert (second.kind, second.chunk_tokens) == (LOCAL, 64)
    assert placer.running_at("d", num_decoding=0)[0] == Running(
        0.1, pending=True, promised_s=second.extra_decode_s, promised_steps=second.extra_steps)
    placer.decoding("d", "r1", SLO(tpot_s=0.1), SamplingParams())  # r1's first token: decoding now
    placer.forget("r2")  # r2 failed before its first
    assert placer.running_at("d", num_decoding=1) == (Running(0.1, request_id="r1"),)


def test_chunk_size_and_speculation_length_are_chosen_together():
    # A worker with 50 ms of overhead a step, drafts that cost 2 ms to propose (4 ms with their
    # verification) and four requests accepting 60% of them, at the k = 2 its controller gave
    # them for plain steps.
    model = MixedStepModel.from_coefficients(COEFFICIENTS | {"const": 0.05, "draft_tokens": 0.002})
    batch = [SpecRequest(f"r{i}", alpha=0.6, context_tokens=0, k_max=4) for i in range(4)]
    assert set(choose_k(batch, lambda b, t, c, drafts: model.predict(4, drafts, 0)).values()) == {2}
    running = tuple(Running(0.1, request_id=f"r{i}", alpha=0.6, k=2) for i in range(4))
    held_k = side(model=model, running=running, num_draft_tokens=8)
    alone = local_option(held_k, PROMPT, EXACT)
    assert (alone.chunk_tokens, alone.predicted_ttft_s) == (64, pytest.approx(0.58))
    # Chosen together: a step that carries a chunk is dearer, so a draft is worth more there --
    # at k = 3 the requests keep enough more tokens a step to absorb 128-token chunks, and the
    # prompt's first token comes sooner (2 steps, 422 ms) despite the extra drafts.
    joint = local_option(replace(held_k, choose_ks=lambda step_time: choose_k(batch, step_time)), PROMPT, EXACT)
    assert (joint.chunk_tokens, joint.draft_ks) == (128, tuple((f"r{i}", 3) for i in range(4)))
    assert joint.predicted_ttft_s == pytest.approx(0.422)


def test_a_worker_s_local_and_remote_prefills_are_corrected_apart():
    placer = Placer(ClusterView(MemoryStore(), get_actor=lambda name: None), SpecController(), 16, EXACT, SLO())
    local = local_option(side(num_decoding=0), PROMPT, EXACT)
    placer.observe(local, ttft_s=2 * local.predicted_ttft_s, tpot_s=None)  # its local prefills run slow
    assert placer.corrections.factor("d", TTFT[LOCAL]) == pytest.approx(1.2)
    assert placer.corrections.factor("d", TTFT[REMOTE]) == 1.0  # what it prefills for a hand-off is not


def test_a_burst_s_hand_offs_count_in_their_decode_worker_s_batch_before_they_reach_it():
    store = MemoryStore()
    prefill = {"const": 0.02, "tokens": 0.001, "tokens_sq": 0.0}
    decode = {"const": 0.02, "requests": 0.001, "batched_tokens": 0.002, "context_tokens": 0.0, "draft_tokens": 0.0}
    for worker_id, kind in (("p", "prefill"), ("d", "decode")):
        store.register_worker(WorkerInfo(worker_id, kind, worker_id, "", "node"), 60.0)
        store.report(worker_id, 60.0, WorkerLoad(0, 0, 100, 100), {PrefillModel.NAME: prefill,
                                                                   DecodeStepModel.NAME: decode})
    view = ClusterView(store, get_actor=lambda name: None)
    placer = Placer(view, SpecController(), 16, EXACT, default_slo=SLO())
    asyncio.run(view.refresh(force=True))

    def placed(request_id: str):
        req = RoutedRequest(request_id, list(range(PROMPT)), SamplingParams(), SLO(), 0.0)
        return asyncio.run(placer.place(req, local=False))

    first, second = placed("r1"), placed("r2")
    # r1's hand-off has not reached d (nothing in flight there yet): it counts all the same.
    assert (view.inflight["d"], placer.batch_at("d")) == (0, 2)
    assert (first.predicted_tpot_s, second.predicted_tpot_s) == (pytest.approx(0.023), pytest.approx(0.026))
    placer.decoding("d", "r1", SLO(), SamplingParams())  # r1 streams from d now; r2 still on its way
    placer.forget("r1")
    assert placer.batch_at("d") == 2


def _elastic_pair(running_at_p: int) -> MemoryStore:
    """A prefill-pool worker p that decodes ``running_at_p`` requests of its own, and an idle decode worker d."""
    store = MemoryStore()
    prefill = {"const": 0.02, "tokens": 0.001, "tokens_sq": 0.0}
    decode = {"const": 0.02, "requests": 0.001, "batched_tokens": 0.002, "context_tokens": 0.0, "draft_tokens": 0.0}
    for worker_id, kind, running in (("p", "prefill", running_at_p), ("d", "decode", 0)):
        store.register_worker(WorkerInfo(worker_id, kind, worker_id, "", "node"), 60.0)
        store.report(worker_id, 60.0, WorkerLoad(0, running, 100, 100),
                     {PrefillModel.NAME: prefill, DecodeStepModel.NAME: decode, MixedStepModel.NAME: COEFFICIENTS})
    return store


@pytest.mark.parametrize("admission", [True, False])
def test_a_prefill_worker_that_decodes_too_takes_remote_prompts_in_chunks_its_requests_absorb(admission):
    # p decodes 4 requests (of another router: just started under the default 100 ms SLO), so a
    # remote prompt's prefill there delays them as a local one would: 64-token chunks, as in
    # test_the_fastest_local_prefill_the_running_requests_absorb_is_used (without the newcomer
    # in p's batch: it decodes at d).
    config = replace(EXACT, admission=admission)
    view = ClusterView(_elastic_pair(running_at_p=4), get_actor=lambda name: None)
    asyncio.run(view.refresh(force=True))

    def placed(tpot_slo_s: float):
        placer = Placer(view, SpecController(), 16, config, default_slo=SLO(tpot_s=tpot_slo_s))
        req = RoutedRequest("r", list(range(PROMPT)), SamplingParams(), SLO(ttft_s=10.0, tpot_s=0.1), 0.0)
        return asyncio.run(placer.place(req, local=False)), placer

    chosen, placer = placed(0.1)
    assert (chosen.kind, chosen.prefill_worker, chosen.decode_worker, chosen.chunk_tokens) == (REMOTE, "p", "d", 64)
    assert chosen.predicted_ttft_s == pytest.approx(4 * 0.032 + 0.004 + 0.2) and chosen.extra_steps == 4
    # Requests at p that allow 5 ms a step absorb no chunk: refused, or placed all the same.
    if admission:
        with pytest.raises(CapacityError, match="every prefill worker decodes requests"):
            placed(0.04)
    else:  # its smallest chunks, weighed with the delay they impose at p
        fallback = placed(0.04)[0]
        assert (fallback.kind, fallback.chunk_tokens, fallback.extra_steps) == (REMOTE, 32, 7)
        assert fallback.extra_decode_s > 0
    view.inflight_tokens.clear()


def test_an_idle_prefill_worker_prefills_remote_prompts_whole_as_before():
    view = ClusterView(_elastic_pair(running_at_p=0), get_actor=lambda name: None)
    asyncio.run(view.refresh(force=True))
    placer = Placer(view, SpecController(), 16, EXACT, default_slo=SLO(tpot_s=0.1))
    req = RoutedRequest("r", list(range(PROMPT)), SamplingParams(), SLO(ttft_s=10.0, tpot_s=0.1), 0.0)
    chosen = asyncio.run(placer.place(req, local=False))
    assert (chosen.kind, chosen.chunk_tokens, chosen.extra_steps) == (REMOTE, None, 0)
    assert chosen.predicted_ttft_s == pytest.approx(0.02 + 0.001 * PROMPT)


def test_a_hand_off_gives_way_to_running_the_request_where_it_would_be_prefilled():
    # The prefill model says p prefills it in 200 ms, the mixed-step model (corrected 2x) 442 ms:
    # by cost the hand-off wins. But p decodes no more than d, so running it on p meets the SLOs
    # with no transfer and spreads the decodes: the hand-off is no candidate.
    on_p = LocalSide("p", MIXED, 0, 0, context_tokens=0, ttft_correction=2.0)
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    chosen = place(PROMPT, slo, Remote("p", "d", 0.2, 0.035, decode_batch=4), [on_p], EXACT)
    assert (chosen.kind, chosen.prefill_worker, chosen.decode_worker) == (LOCAL, "p", "p")
    # p decodes more than d: handing off spreads them better; and a local run that misses its
    # SLO dominates nothing.
    busier_p = replace(on_p, num_decoding=5, running=(Running(0.1, num_tokens=50, decode_s=1.75),) * 5)
    assert place(PROMPT, slo, Remote("p", "d", 0.2, 0.035, decode_batch=4), [busier_p], EXACT).kind == REMOTE
    assert place(PROMPT, SLO(ttft_s=0.3, tpot_s=0.1), Remote("p", "d", 0.2, 0.035, decode_batch=4), [on_p],
                 EXACT).kind == REMOTE
