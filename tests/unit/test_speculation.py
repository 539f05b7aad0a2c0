"""Speculative decoding on the real model: greedy output identical to plain decoding for every
proposer and k (alone, batched, mixed k, k changed mid-request), draft = target accepts
everything, KV blocks return to idle after rejections, aborts and preemption, bad input."""

from __future__ import annotations

import pytest

from splitserve import LLM, SamplingParams
from splitserve.config import SpeculativeConfig
from tests.conftest import PROMPTS

PASSAGE = (
    "The river rises in the northern hills, runs south through the old town, turns east at the "
    "mill and reaches the sea after forty miles. Fishermen say the river is widest at the mill."
)
EXTRACTIVE = [
    f"Repeat this passage exactly: {PASSAGE}\nRepeated: {PASSAGE[:60]}",
    f"{PASSAGE}\nQuestion: Where does the river turn east? Answer:",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "one two three four five, one two three four five, one two three",
    f"Summary of the text below.\n{PASSAGE}\nSummary: The river",
    "A B C D E F G A B C D E F G A B C",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Monday, Tuesday,",
    "<|im_start|>user\nCopy: red green blue red green blue<|im_end|>\n<|im_start|>assistant\n",
]
PROMPTS_16 = PROMPTS + EXTRACTIVE
NEW_TOKENS = 40


def greedy(k: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, num_speculative_tokens=k)


@pytest.fixture(scope="module")
def reference(llm) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS_16, greedy())]


@pytest.fixture(scope="module")
def spec_llms(loaded) -> dict[str, LLM]:
    return {name: LLM(proposer=name, loaded=loaded) for name in ("ngram", "draft", "layer_skip")}


def _assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks
    proposer_cache = getattr(engine.proposer, "kv_cache", None)
    if proposer_cache is not None:  # the draft model's own cache
        assert proposer_cache.num_free_blocks == proposer_cache.pool.num_blocks


@pytest.mark.parametrize("proposer", ["ngram", "draft", "layer_skip"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_batched_greedy_output_is_identical(spec_llms, reference, proposer, k):
    llm = spec_llms[proposer]
    outputs = llm.generate(PROMPTS_16, greedy(k))
    assert [o.token_ids for o in outputs] == reference
    assert sum(o.spec.num_draft_tokens for o in outputs) > 0  # speculation really ran
    _assert_idle(llm)


@pytest.mark.parametrize("proposer", ["ngram", "draft", "layer_skip"])
def test_alone_greedy_output_is_identical(spec_llms, reference, proposer):
    llm = spec_llms[proposer]
    for prompt, expected in zip(PROMPTS_16, reference):
        assert llm.generate(prompt, greedy(3))[0].token_ids == expected
    _assert_idle(llm)


@pytest.mark.parametrize("proposer", ["ngram", "layer_skip"])
def test_mixed_k_in_one_batch(spec_llms, reference, proposer):
    llm = spec_llms[proposer]
    params = [greedy(k) for k in (0, 1, 2, 3, 4, 5, 6, 8) * 2]
    assert [o.token_ids for o in llm.generate(PROMPTS_16, params)] == reference
    _assert_idle(llm)


def test_k_changed_mid_request(spec_llms, reference):
    engine = spec_llms["ngram"].engine
    ids = [engine.add_request(p, greedy(2)) for p in PROMPTS_16]
    finished, step = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.token_ids
        step += 1
        for n, request_id in enumerate(ids):
            if request_id not in finished:  # cycle every request through k = 0, 5, 1, 3
                engine.set_speculation(request_id, (0, 5, 1, 3)[(step + n) % 4])
    assert [finished[i] for i in ids] == reference
    _assert_idle(spec_llms["ngram"])


@pytest.mark.parametrize("k", [1, 4])
def test_draft_equal_to_target_accepts_every_draft(spec_llms, k):
    llm = spec_llms["draft"]
    llm.engine.step_stats.clear()
    outputs = llm.generate(PROMPTS[:4], greedy(k))
    for out in outputs:
        assert out.spec.num_draft_tokens > 0
        assert out.spec.acceptance_rate == 1.0
        # verification steps produce every token after the first, except possibly a final
        # plain step when one token is left (no room for a draft)
        assert out.spec.num_accepted_tokens + out.spec.num_steps in (NEW_TOKENS - 1, NEW_TOKENS - 2)
        assert out.spec.mean_kept_tokens > k
    verify_steps = [s for s in llm.engine.step_stats if s.num_draft_tokens]
    # Every verification step keeps k + 1 tokens per request (k accepted + the bonus),
    # until a request is within k + 1 tokens of its max_tokens.
    full = [s for s in verify_steps if s.num_draft_tokens == k * s.num_requests]
    assert full and all(s.num_accepted_tokens == s.num_draft_tokens for s in verify_steps)
    steps_per_request = 1 + -(-(NEW_TOKENS - 1) // (k + 1))  # prefill + decode steps
    assert len(llm.engine.step_stats) == steps_per_request
    _assert_idle(llm)


def test_preemption_and_aborts_with_speculation_leak_nothing(loaded, reference):
    llm = LLM(proposer="ngram", loaded=loaded, num_kv_blocks=14, enable_prefix_caching=False)
    outputs = llm.generate(PROMPTS_16[:8], greedy(4))
    assert [o.token_ids for o in outputs] == reference[:8]
    assert llm.engine.scheduler.num_preemptions > 0
    _assert_idle(llm)
    engine = llm.engine
    ids = [engine.add_request(p, greedy(4)) for p in PROMPTS_16[8:]]
    for _ in range(6):
        engine.step()
    for request_id in ids[::2]:
        engine.abort(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    _assert_idle(llm)


def test_draft_proposer_cache_survives_preemption(loaded, reference):
    llm = LLM(proposer="draft", loaded=loaded, num_kv_blocks=14, enable_prefix_caching=False)
    outputs = llm.generate(PROMPTS_16[8:], greedy(3))
    assert [o.token_ids for o in outputs] == reference[8:]
    assert llm.engine.scheduler.num_preemptions > 0
    _assert_idle(llm)


def test_seeded_sampling_with_speculation_is_reproducible(spec_llms):
    llm = spec_llms["ngram"]
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=5, num_speculative_tokens=3)
    first = llm.generate(EXTRACTIVE[0], params)[0]
    second = llm.generate(EXTRACTIVE[0], params)[0]
    assert first.token_ids == second.token_ids and len(first.token_ids) == 24
    _assert_idle(llm)


def test_bad_speculation_input(llm, spec_llms):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SamplingParams(num_speculative_tokens=-1)
    with pytest.raises(ValueError, match="needs an engine with a proposer"):
        llm.engine.add_request("hi", SamplingParams(num_speculative_tokens=2))
    engine = spec_llms["ngram"].engine
    with pytest.raises(ValueError, match="max_speculative_tokens"):
        engine.add_request("hi", SamplingParams(num_speculative_tokens=99))
    with pytest.raises(ValueError, match="proposer must be one of"):
        SpeculativeConfig("medusa")
    with pytest.raises(ValueError, match="need a proposer"):
        LLM(num_speculative_tokens=3)
    with pytest.raises(ValueError, match="not running"):
        engine.set_speculation("no-such-request", 1)
    request_id = engine.add_request("hi", greedy(1))
    with pytest.raises(ValueError, match="max_speculative_tokens"):
        engine.set_speculation(request_id, 9)
    while engine.has_unfinished_requests():
        engine.step()
    _assert_idle(spec_llms["ngram"])
