"""LLMEngine / LLM behaviour on the real model: batching, chunking, prefix cache, preemption,
stop conditions, seeds, aborts and bad input. Every test ends with the KV pool back at idle."""

from __future__ import annotations

import os

import pytest

from splitserve import SamplingParams
from tests.conftest import PROMPTS

GREEDY_32 = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def _assert_idle(llm) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks


@pytest.fixture(scope="module")
def alone(llm) -> list[list[int]]:
    """Greedy tokens of each prompt run on its own: the reference for batch invariance."""
    outputs = [llm.generate(p, GREEDY_32)[0].token_ids for p in PROMPTS]
    llm.engine.block_pool.reset_prefix_cache()
    return outputs


@pytest.mark.parametrize(
    "engine_args",
    [
        {"enable_prefix_caching": False},
        {"enable_prefix_caching": False, "max_num_batched_tokens": 24},  # prompts split in chunks
        {"enable_prefix_caching": False, "enable_chunked_prefill": False, "max_num_batched_tokens": 512},
    ],
    ids=["packed", "chunked", "no-chunking"],
)
def test_batch_invariance(make_llm, alone, engine_args):
    llm = make_llm(**engine_args)
    batched = llm.generate(PROMPTS, GREEDY_32)
    assert [o.token_ids for o in batched] == alone
    _assert_idle(llm)


def test_prefix_cache_hit_reuses_blocks_and_keeps_output(make_llm, alone):
    llm = make_llm(block_size=4)
    first = llm.generate(PROMPTS, GREEDY_32)
    engine = llm.engine
    request_id = engine.add_request(PROMPTS[4], GREEDY_32)
    engine.step()
    request = next(r for r in engine.scheduler.running if r.request_id == request_id)
    # The whole prompt but its last (partial) block came from the cache.
    assert request.num_computed_tokens >= request.num_prompt_tokens - 4
    while engine.has_unfinished_requests():
        engine.step()
    second = llm.generate(PROMPTS, GREEDY_32)
    assert [o.token_ids for o in first] == [o.token_ids for o in second] == alone
    _assert_idle(llm)


def test_shared_system_prompt_hits_across_requests(make_llm):
    llm = make_llm(block_size=8)
    system = "You are a careful assistant. Answer briefly and truthfully. " * 3
    llm.generate(system + "What is 2+2?", GREEDY_32)
    engine = llm.engine
    engine.add_request(system + "Name a fruit.", GREEDY_32)
    engine.step()
    hit = engine.scheduler.running[0].num_computed_tokens
    assert hit >= len(llm.tokenizer.encode(system)) - 8 - 2  # all full blocks of the shared part
    while engine.has_unfinished_requests():
        engine.step()
    _assert_idle(llm)


def test_preemption_under_a_tiny_pool_loses_nothing(make_llm, alone):
    # 12 blocks of 16 tokens cannot hold 8 requests of ~40 tokens: requests get preempted.
    llm = make_llm(num_kv_blocks=12, enable_prefix_caching=False)
    outputs = llm.generate(PROMPTS, GREEDY_32)
    assert [o.token_ids for o in outputs] == alone
    _assert_idle(llm)


def test_a_chunk_cap_keeps_greedy_output_and_step_stats_count_the_chunks(make_llm, alone):
    llm = make_llm(enable_prefix_caching=False)
    engine = llm.engine
    with pytest.raises(ValueError, match="max_chunk_tokens"):
        engine.add_request(PROMPTS[0], GREEDY_32, max_chunk_tokens=0)
    ids = {engine.add_request(PROMPTS[i], GREEDY_32): i for i in range(3)}
    engine.step()
    lengths = [len(llm.tokenizer.encode(p)) for p in PROMPTS]
    first = engine.step_stats[-1]
    assert first.num_prefill_tokens == first.num_batched_tokens == sum(lengths[:3])
    assert first.prefill_attention == sum(n * n for n in lengths[:3])
    ids[engine.add_request(PROMPTS[5], GREEDY_32, max_chunk_tokens=4)] = 5
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert {ids[r]: t for r, t in outputs.items()} == {i: alone[i] for i in ids.values()}
    mixed = [s for s in list(engine.step_stats)[1:] if s.num_prefill_tokens]
    starts = range(0, lengths[5], 4)
    assert [s.num_prefill_tokens for s in mixed] == [min(4, lengths[5] - b) for b in starts]
    assert [s.prefill_attention for s in mixed] == [min(4, lengths[5] - b) * min(b + 4, lengths[5]) for b in starts]
    assert all(s.num_batched_tokens - s.num_prefill_tokens == 3 for s in mixed), "three decodes rode along"
    _assert_idle(llm)


def test_abort_frees_blocks_and_others_continue(make_llm):
    llm = make_llm()
    engine = llm.engine
    keep = engine.add_request(PROMPTS[0], GREEDY_32)
    drop = engine.add_request(PROMPTS[1], GREEDY_32)
    engine.step()
    engine.step()
    engine.abort(drop)
    engine.abort("no-such-request")  # harmless
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == [keep]
    assert len(finished[0].token_ids) == 32
    _assert_idle(llm)


def test_stop_conditions(llm):
    eos = llm.tokenizer.eos_token_id
    chat = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(max_tokens=200, temperature=0))[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] == eos and chat.text.strip()

    base = llm.generate(PROMPTS[2], GREEDY_32)[0]
    token = base.token_ids[5]
    by_token = llm.generate(PROMPTS[2], SamplingParams(max_tokens=32, temperature=0, stop_token_ids=[token]))[0]
    assert by_token.finish_reason == "stop"
    assert by_token.token_ids == base.token_ids[: base.token_ids.index(token) + 1]

    word = base.text.split()[3]
    by_string = llm.generate(PROMPTS[2], SamplingParams(max_tokens=32, temperature=0, stop=[word]))[0]
    assert by_string.finish_reason == "stop"
    assert by_string.text == base.text[: base.text.index(word)]

    short = llm.generate(PROMPTS[2], SamplingParams(max_tokens=3, temperature=0))[0]
    assert short.finish_reason == "length" and short.token_ids == base.token_ids[:3]


def test_streamed_deltas_add_up(llm):
    engine = llm.engine
    engine.add_request(PROMPTS[3], SamplingParams(max_tokens=24, temperature=0, stop=["blue"]))
    text, tokens, last = "", [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.new_text
            tokens += out.new_token_ids
            last = out
    assert last is not None and last.finished
    assert text == last.text and tokens == last.token_ids


def test_seeded_sampling_is_reproducible_alone_and_batched(llm):
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = llm.generate(PROMPTS[0], seeded)[0].token_ids
    others = [SamplingParams(max_tokens=16, temperature=1.0, seed=s) for s in range(3)]
    batched = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]], [others[0], seeded, others[1], others[2]])
    assert batched[1].token_ids == alone
    other_seed = llm.generate(PROMPTS[0], SamplingParams(max_tokens=16, temperature=0.9, seed=99))[0].token_ids
    assert other_seed != alone


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("", None, "prompt"),
        ([], None, "prompt"),
        ([1, 2, 10**6], None, "prompt_token_ids"),
        ([1, -3], None, "prompt_token_ids"),
        ("x " * 9000, None, "max_model_len"),
        ("hi", {"max_tokens": 0}, "max_tokens"),
        ("hi", {"temperature": -0.5}, "temperature"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"top_p": 1.5}, "top_p"),
        ("hi", {"top_k": 0}, "top_k"),
        ("hi", {"stop_token_ids": [10**6]}, "stop_token_ids"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_engine_keeps_serving(llm, prompt, params, field):
    engine = llm.engine
    good = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0))
    with pytest.raises(ValueError, match=field):
        engine.add_request(prompt, SamplingParams(**params) if params else None)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outputs] == [good] and len(outputs[0].token_ids) == 4
    _assert_idle(llm)


def test_one_bad_prompt_fails_generate_without_leaking(llm):
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([PROMPTS[0], ""], SamplingParams(max_tokens=4))
    _assert_idle(llm)


def test_duplicate_request_id_is_refused(llm):
    engine = llm.engine
    engine.add_request("a", SamplingParams(max_tokens=2), request_id="dup")
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("b", SamplingParams(max_tokens=2), request_id="dup")
    while engine.has_unfinished_requests():
        engine.step()
    _assert_idle(llm)


def test_reserve_shares_the_cached_prefix_and_gives_back_exactly_its_references(make_llm):
    llm = make_llm(block_size=4)
    engine, pool = llm.engine, llm.engine.block_pool
    prompt = list(range(300, 322))  # five full blocks of 4 and a partial one
    running = engine.add_request(prompt, GREEDY_32)
    engine.step()  # the prompt is computed and its full blocks cached
    table = list(engine.kv_cache.block_table(running))
    shared = engine.reserve(prompt[:20] + [400, 401], SamplingParams(max_tokens=4), "shared")
    assert shared.num_cached_tokens == 20 and shared.block_ids[:5] == tuple(table[:5])
    assert set(shared.block_ids[5:]).isdisjoint(table)
    # Never the block of the last prompt token: it must arrive, and it computes the first logits.
    aligned = engine.reserve(prompt[:20], SamplingParams(max_tokens=4), "aligned")
    assert aligned.num_cached_tokens == 16 and aligned.block_ids[4] not in table
    assert [pool.blocks[b].ref_count for b in table[:5]] == [3, 3, 3, 3, 2]
    engine.abort("shared")
    engine.abort("aligned")
    assert [pool.blocks[b].ref_count for b in table[:5]] == [1] * 5
    while engine.has_unfinished_requests():
        engine.step()
    _assert_idle(llm)
    # Free but cached blocks are taken back for a reservation, and given back again.
    revived = engine.reserve(prompt, SamplingParams(max_tokens=4), "revived")
    assert revived.num_cached_tokens == 20 and revived.block_ids[:5] == tuple(table[:5])
    engine.abort("revived")
    _assert_idle(llm)
    cold = make_llm(block_size=4, enable_prefix_caching=False)
    cold.generate([prompt], SamplingParams(max_tokens=2))
    assert cold.engine.reserve(prompt, SamplingParams(max_tokens=4), "cold").num_cached_tokens == 0
    cold.engine.abort("cold")
    _assert_idle(cold)


def _run(engine, prompt, params, **kwargs) -> tuple[list[int], str, list]:
    """One request to its end: the tokens and text its outputs streamed, and the outputs."""
    request_id = engine.add_request(prompt, params, **kwargs)
    tokens, text, outputs = [], "", []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                tokens, text, outputs = tokens + out.new_token_ids, text + out.new_text, outputs + [out]
    return tokens, text, outputs


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=["zzz-never"]),  # text held back
    SamplingParams(max_tokens=24, temperature=0.9, top_k=50, seed=1234, ignore_eos=True),
], ids=["greedy", "greedy-stop-string", "seeded"])
def test_a_continued_request_goes_on_exactly_where_it_left_off(llm, params):
    """What a worker that died had streamed, given to another engine: the rest of the stream
    is the uninterrupted run's (tokens, text and, seeded, the random stream)."""
    from splitserve.engine.continuation import Continuation

    engine = llm.engine
    tokens, text, outputs = _run(engine, PROMPTS[1], params)
    cut = next(i for i, o in enumerate(outputs) if len(o.token_ids) >= 9)  # the last output before "death"
    sent_tokens, sent_text = outputs[cut].token_ids, "".join(o.new_text for o in outputs[: cut + 1])
    state = outputs[cut].generator_state
    assert (state is not None) == (params.seed is not None)  # every output of a seeded request carries it
    continuation = Continuation(tuple(sent_tokens), len(sent_text), state)
    rest, rest_text, rest_outputs = _run(engine, PROMPTS[1], params, continuation=continuation)
    assert sent_tokens + rest == tokens and sent_text + rest_text == text
    assert rest_outputs[-1].token_ids == tokens and rest_outputs[-1].finish_reason == "length"
    _assert_idle(llm)


@pytest.mark.parametrize(("continuation", "kwargs", "match"), [
    ({"output_token_ids": ()}, {}, "one or more token ids"),
    ({"output_token_ids": (1, 10**6)}, {}, "one or more token ids"),
    ({"output_token_ids": (1,) * 4}, {}, "nothing is left"),
    ({"output_token_ids": (1, 2), "num_emitted_chars": 10**4}, {}, "num_emitted_chars"),
    ({"output_token_ids": (1, 2), "generator_state": b"junk"}, {}, "generator_state"),
    ({"output_token_ids": (1, 2)}, {"export_kv": True}, "export_kv"),
])
def test_a_continuation_that_cannot_go_on_is_a_clear_error(llm, continuation, kwargs, match):
    from splitserve.engine.continuation import Continuation

    engine = llm.engine
    seeded = SamplingParams(max_tokens=4, temperature=0.5, seed=3)
    with pytest.raises(ValueError, match=match):
        engine.add_request(PROMPTS[0], seeded, continuation=Continuation(**continuation), **kwargs)
    assert llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0))[0].token_ids  # still serving
    _assert_idle(llm)


def test_loading_caps_onednns_primitive_cache_unless_the_environment_sets_it(monkeypatch):
    from splitserve.engine.runner import ONEDNN_PRIMITIVE_CACHE_CAPACITY, limit_onednn_cache

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    limit_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_PRIMITIVE_CACHE_CAPACITY)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    limit_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"
