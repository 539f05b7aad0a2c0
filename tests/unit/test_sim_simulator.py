"""The discrete-event simulator: exact times for a lone request, queueing theory for a queue,
and the invariants of every run (all requests finish with their tokens, KV within capacity,
one result per seed). Profiles are built here; nothing is timed."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import pytest

from splitserve.config import SimConfig
from splitserve.loadtest.arrivals import parse_arrival
from splitserve.loadtest.metrics import request_metrics
from splitserve.loadtest.workloads import parse_workload
from splitserve.sim.outcome import SimResult
from splitserve.sim.profile import DecodeCoefficients, InstanceProfile, LatencyProfile, Triple
from splitserve.sim.results import to_records
from splitserve.sim.simulator import simulate
from splitserve.sim.trace import SimRequest, make_requests

DISAGGREGATED = SimConfig(num_prefill=2, num_decode=2)
PREFILL_FIRST = SimConfig(mode="colocated", num_instances=2)
CHUNKED = SimConfig(mode="colocated", num_instances=2, colocated_scheduler="chunked", max_batched_tokens=256)
# The router's order and the engine's prefill steps (bench.sim_validation's disaggregated).
AS_SERVED = SimConfig(num_prefill=2, num_decode=2, decode_choice="arrival", prefill_batching="chunked",
                      max_batched_tokens=256)
CONFIGS = {"disaggregated": DISAGGREGATED, "prefill-first": PREFILL_FIRST, "chunked": CHUNKED,
           "disaggregated as served": AS_SERVED}


def instance(kv_capacity: int = 100_000, tp: int = 1) -> InstanceProfile:
    """OPT-13B-like numbers (ms), with a threshold low enough for tests to cross it."""
    decode = DecodeCoefficients(Triple(20.0, 6e-4, 0.04), Triple(7.0, 6e-4, 0.16), threshold=8)
    return InstanceProfile(tp, Triple(18.0, 0.1, 7e-6), decode, kv_capacity)


def profile(kv_capacity: int = 100_000, **transfer: float) -> LatencyProfile:
    return LatencyProfile("test-model", "test-gpu", "test", (instance(kv_capacity), instance(kv_capacity, 2)),
                          **transfer)


def chat(rate: float, num_requests: int = 300, seed: int = 0) -> list[SimRequest]:
    return make_requests(parse_workload("chat"), parse_arrival("poisson"), rate, num_requests, seed=seed, scale=0.25)


def metrics_of(result: SimResult):
    return [request_metrics(record) for record in to_records(result)]


# --------------------------------------------------------------------------------- exact times


@pytest.mark.parametrize("config", [DISAGGREGATED, PREFILL_FIRST], ids=["disaggregated", "prefill-first"])
def test_a_lone_request_takes_the_profile_formulas(config):
    prompt, output = 512, 40
    p = instance()
    (metrics,) = metrics_of(simulate(profile(), config, [SimRequest(0, 3.0, prompt, output)]))
    steps_ms = [p.decode.small.a + p.decode.small.b * (prompt + i + 1) + p.decode.small.c for i in range(output - 1)]
    assert metrics.ttft_s == pytest.approx((18.0 + 0.1 * prompt + 7e-6 * prompt**2) / 1e3, rel=1e-12)
    assert metrics.tpot_s == pytest.approx(sum(steps_ms) / (output - 1) / 1e3, rel=1e-12)
    assert metrics.output_tokens == output


def test_a_lone_chunked_prompt_pays_its_chunks_attention():
    """With nothing decoding, a chunked prompt is prefill iterations of n tokens from start s:
    a + b n + c n (s + n) each; then it decodes as alone."""
    p = instance()
    (metrics,) = metrics_of(simulate(profile(), CHUNKED, [SimRequest(0, 0.0, 600, 2)]))
    chunks = [(256, 0), (256, 256), (88, 512)]
    ttft_ms = sum(p.prefill.a + p.prefill.b * n + p.prefill.c * n * (s + n) for n, s in chunks)
    assert metrics.ttft_s == pytest.approx(ttft_ms / 1e3, rel=1e-12)
    assert metrics.e2e_s - metrics.ttft_s == pytest.approx(p.decode_ms(1, 601) / 1e3, rel=1e-12)


def test_a_chunk_beside_decodes_adds_its_marginal_prefill_cost():
    p = instance()
    assert p.mixed_ms(3, 900, [(100, 50)]) == pytest.approx(p.decode_ms(3, 900) + 0.1 * 100 + 7e-6 * 100 * 150)
    assert p.mixed_ms(3, 900, []) == p.decode_ms(3, 900)


def test_kv_transfer_takes_the_profiles_bandwidth():
    free = simulate(profile(), DISAGGREGATED, [SimRequest(0, 0.0, 1000, 3)])
    paid = simulate(profile(kv_bytes_per_token=1e6, kv_transfer_bytes_per_s=1e10), DISAGGREGATED,
                    [SimRequest(0, 0.0, 1000, 3)])
    (before,), (after,) = metrics_of(free), metrics_of(paid)
    assert after.ttft_s == before.ttft_s  # the first token comes from the prefill instance
    assert after.e2e_s - before.e2e_s == pytest.approx(1000 * 1e6 / 1e10)
    assert paid.jobs[0].transfer_s == pytest.approx(0.1) and free.jobs[0].transfer_s == 0.0


def test_a_one_token_request_never_decodes():
    result = simulate(profile(), DISAGGREGATED, [SimRequest(0, 0.0, 100, 1)])
    assert result.jobs[0].decode_instance is None
    assert result.token_times(result.jobs[0]) == [result.jobs[0].finish_s]


def test_decode_step_crosses_the_batch_threshold():
    """Eight requests decoding together (threshold 8) take the large-batch triple."""
    requests = [SimRequest(i, 0.0, 100, 3) for i in range(8)]
    result = simulate(profile(), SimConfig(num_decode=1), requests)
    ends = result.step_ends[0]
    assert ends[-1] - ends[-2] == pytest.approx(instance().decode_ms(8, 8 * 102) / 1e3)
    assert instance().decode_ms(8, 8 * 102) != instance().decode.small.a + 6e-4 * 8 * 102 + 0.04 * 8


# --------------------------------------------------------------------------------- queueing


def test_prefill_queue_is_md1():
    """Poisson arrivals, one constant service time (a KV capacity of one prompt forces batches
    of one): the mean wait is the Pollaczek-Khinchine value, lambda S^2 / (2 (1 - rho))."""
    prompt, rho, num_requests = 1000, 0.7, 50_000
    service_s = instance().prefill_ms([prompt]) / 1e3
    rate = rho / service_s
    requests = make_requests(parse_workload(f"fixed:{prompt}/1"), parse_arrival("poisson"), rate, num_requests, seed=3)
    result = simulate(profile(kv_capacity=prompt), SimConfig(num_prefill=1), requests)
    waits = [m.ttft_s - service_s for m in metrics_of(result)]
    assert min(waits) == pytest.approx(0.0, abs=1e-12)
    expected = rate * service_s**2 / (2 * (1 - rho))
    assert sum(waits) / len(waits) == pytest.approx(expected, rel=0.03)


def test_prefill_batches_whole_prompts_within_capacity():
    """Three prompts queued behind a running one: the next batch takes the two that fit."""
    requests = [SimRequest(0, 0.0, 400, 1), SimRequest(1, 0.001, 400, 1), SimRequest(2, 0.001, 500, 1),
                SimRequest(3, 0.001, 300, 1)]
    result = simulate(profile(kv_capacity=1000), SimConfig(num_prefill=1), requests)
    ends = [job.prefill_end_s for job in result.jobs]
    p = instance()
    assert ends[0] == pytest.approx(p.prefill_ms([400]) / 1e3)
    assert ends[1] == ends[2] == pytest.approx(ends[0] + p.prefill_ms([400, 500]) / 1e3)
    assert ends[3] == pytest.approx(ends[1] + p.prefill_ms([300]) / 1e3)


def test_chunked_prefill_batches_are_engine_steps_of_prompt_chunks():
    """A 600-token prompt and a 100-token one together, 256 tokens a step: 256, 256, then the
    first's last 88 tokens with the second whole prompt; both first tokens at that step's end."""
    requests = [SimRequest(0, 0.0, 600, 2), SimRequest(1, 0.0, 100, 2)]
    result = simulate(profile(), replace(AS_SERVED, num_prefill=1), requests)
    p = instance()
    steps = [[(256, 0)], [(256, 256)], [(88, 512), (100, 0)]]
    ends = [sum(p.prefill_batch_ms(sum(n for n, _ in step), sum(n * (s + n) for n, s in step))
                for step in steps[:k + 1]) / 1e3 for k in range(len(steps))]
    assert [job.prefill_end_s for job in result.jobs] == pytest.approx([ends[2], ends[2]], rel=1e-12)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_an_instance_admits_at_most_max_num_seqs_requests(config):
    """With room in KV for all, at most 3 requests decode (or are admitted) at once per instance:
    counted from the requests' own decode steps; without the bound, more do."""
    requests = make_requests(parse_workload("fixed:50/40"), parse_arrival("poisson"), 40.0, 60, seed=2)

    def most_at_a_step(max_num_seqs: int | None) -> int:
        result = simulate(profile(), replace(config, max_num_seqs=max_num_seqs), requests)
        at_step: dict[tuple[int | None, int], int] = defaultdict(int)
        for job in result.jobs:
            for i in range(job.request.output_tokens - 1):
                at_step[(job.decode_instance, job.first_step + i)] += 1
        return max(at_step.values())

    assert most_at_a_step(3) <= 3 < most_at_a_step(None)


def test_new_requests_go_to_the_least_loaded_prefill_instance():
    requests = [SimRequest(0, 0.0, 2000, 1), SimRequest(1, 0.0, 100, 1), SimRequest(2, 0.001, 100, 1)]
    result = simulate(profile(), SimConfig(num_prefill=2), requests)
    assert [job.prefill_instance for job in result.jobs] == [0, 1, 1]


# --------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_every_request_finishes_with_its_tokens(config):
    requests = chat(rate=6.0)
    result = simulate(profile(), config, requests)
    records = to_records(result)
    assert [r.index for r in records] == [r.index for r in requests]
    for request, record, job in zip(requests, records, result.jobs, strict=True):
        times = [chunk.t for chunk in record.chunks]
        assert (record.prompt_tokens, record.output_tokens) == (request.prompt_tokens, request.output_tokens)
        assert record.sent_s == request.arrival_s and record.finished_s == times[-1]
        assert times == sorted(times) and times[0] > request.arrival_s
        assert len(set(times)) == len(times)  # one decode step, one token
        assert job.prefill_end_s == times[0]


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_kv_capacity_holds_at_every_step(config):
    """Recomputed from the requests' own decode steps, not from the simulator's counters: at every
    decode step of every instance the KV read (sum of C_i + 1) stays within capacity, and the
    capacity binds (some requests wait for it)."""
    capacity = 3000  # five requests of 599 tokens of KV
    requests = make_requests(parse_workload("fixed:400/200"), parse_arrival("poisson"), 5.0, 100, seed=1)
    result = simulate(profile(kv_capacity=capacity), config, requests)
    at_step: dict[tuple[int | None, int], int] = defaultdict(int)
    for job in result.jobs:
        r = job.request
        for i in range(r.output_tokens - 1):
            at_step[(job.decode_instance, job.first_step + i)] += r.prompt_tokens + i + 1
    assert max(at_step.values()) <= capacity
    assert max(at_step.values()) > capacity * 0.8
    for stats in result.instances:
        assert stats.peak_kv_tokens <= stats.kv_capacity_tokens
    second_token_s = [result.token_times(job)[1] - job.request.arrival_s for job in result.jobs]
    assert max(second_token_s) > 10.0  # queued for KV: a step is ~20 ms


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_one_seed_one_result(config):
    def run(seed: int) -> list[dict]:
        return [r.to_dict() for r in to_records(simulate(profile(), config, chat(5.0, 150, seed)))]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_more_load_means_longer_waits():
    light = metrics_of(simulate(profile(), DISAGGREGATED, chat(rate=1.0)))
    heavy = metrics_of(simulate(profile(), DISAGGREGATED, chat(rate=40.0)))
    assert sum(m.ttft_s for m in heavy) > 2 * sum(m.ttft_s for m in light)


# --------------------------------------------------------------------------------- bad input


def test_a_request_that_can_never_fit_is_refused_before_running():
    with pytest.raises(ValueError, match=r"request 1: its 1100 tokens of KV .* exceed a decode instance's"):
        simulate(profile(kv_capacity=1000), DISAGGREGATED, [SimRequest(0, 0.0, 10, 2), SimRequest(1, 0.0, 600, 501)])
    with pytest.raises(ValueError, match=r"request 0: its 1001-token prompt exceeds a prefill instance's"):
        simulate(profile(kv_capacity=1000), DISAGGREGATED, [SimRequest(0, 0.0, 1001, 1)])
    with pytest.raises(ValueError, match=r"request 0: its 1100 tokens of KV .* exceed an instance's capacity"):
        simulate(profile(kv_capacity=1000), PREFILL_FIRST, [SimRequest(0, 0.0, 600, 501)])


def test_missing_tp_degree_is_named():
    with pytest.raises(ValueError, match=r"no profile for TP 4 \(it has TP 1, 2\)"):
        simulate(profile(), replace(DISAGGREGATED, decode_tp=4), [SimRequest(0, 0.0, 10, 2)])


@pytest.mark.parametrize(("changes", "message"), [
    ({"mode": "hybrid"}, "mode must be one of"),
    ({"colocated_scheduler": "fifo"}, "colocated_scheduler must be one of"),
    ({"num_decode": 0}, "num_decode must be >= 1, got 0"),
    ({"max_batched_tokens": 0}, "max_batched_tokens must be >= 1"),
])
def test_bad_configs_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        SimConfig(**changes)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="needs an open-loop arrival"):
        make_requests(parse_workload("chat"), parse_arrival("concurrency:4"), 1.0, 10)
    with pytest.raises(ValueError, match="request 3: needs >= 1 prompt and output token"):
        SimRequest(3, 0.0, 10, 0)
    with pytest.raises(ValueError, match="order of arrival"):
        simulate(profile(), DISAGGREGATED, [SimRequest(0, 1.0, 10, 2), SimRequest(1, 0.5, 10, 2)])


def test_file_workloads_need_token_counts(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt_tokens": 30, "max_tokens": 4}\n{"prompt_tokens": 50, "max_tokens": 2}\n')
    requests = make_requests(parse_workload(f"file:{path}"), parse_arrival("constant"), 2.0, 3)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in requests] == [(0.0, 30, 4), (0.5, 50, 2),
                                                                                   (1.0, 30, 4)]
    path.write_text('{"prompt": "hello there", "max_tokens": 4}\n')
    with pytest.raises(ValueError, match=r"w.jsonl:1: the simulator needs \"prompt_tokens\""):
        make_requests(parse_workload(f"file:{path}"), parse_arrival("constant"), 2.0, 3)


def test_a_context_cap_cuts_sampled_lengths_and_refuses_written_ones():
    """Chat lengths fit in 2048 tokens (output first to 2047, then the prompt); nothing else changes."""
    free = make_requests(parse_workload("chat"), parse_arrival("poisson"), 1.0, 2000, seed=4)
    capped = make_requests(parse_workload("chat"), parse_arrival("poisson"), 1.0, 2000, seed=4,
                           max_context_tokens=2048)
    assert max(r.prompt_tokens + r.output_tokens for r in free) > 2048
    for a, b in zip(free, capped, strict=True):
        assert b.arrival_s == a.arrival_s and b.prompt_tokens + b.output_tokens <= 2048
        assert b.output_tokens == min(a.output_tokens, 2047)
        assert b.prompt_tokens == min(a.prompt_tokens, 2048 - b.output_tokens)
    fixed = make_requests(parse_workload("fixed:2000/48"), parse_arrival("constant"), 1.0, 3, max_context_tokens=2048)
    assert {(r.prompt_tokens, r.output_tokens) for r in fixed} == {(2000, 48)}
    with pytest.raises(ValueError, match=r"request 0's 2000 prompt \+ 49 output tokens exceed max_context_tokens 2048"):
        make_requests(parse_workload("fixed:2000/49"), parse_arrival("constant"), 1.0, 3, max_context_tokens=2048)
    with pytest.raises(ValueError, match="max_context_tokens must be >= 2"):
        make_requests(parse_workload("chat"), parse_arrival("constant"), 1.0, 3, max_context_tokens=1)
