"""The KV handoff between two engines in one process, over the real transfer backends.

A prefill engine (``export_kv``) streams through a ``KVStreamer`` into blocks a decode engine
reserved (``KVIngest`` behind a real receiver), and the decode engine finishes the request.
The output must equal the offline engine's, and the K/V that arrived must equal the K/V the
prefill side computed. A prompt whose prefix the decode engine has cached takes that prefix
from its own blocks: only the tail travels, and the output stays the same.
"""

from __future__ import annotations

import time

import pytest
import torch

from splitserve.config import EngineConfig
from splitserve.engine.engine import KVSlice, LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import CapacityError
from splitserve.protocol import KVDestination
from splitserve.transfer import TransferError, gather_kv, make_receiver, make_sender
from splitserve.transfer.handoff import HandoffReport, KVIngest, KVStreamer
from tests.conftest import PROMPTS

BLOCK = 16


class Pair:
    """A prefill engine and a decode engine joined by one transfer backend."""

    def __init__(self, loaded, backend: str, *, codec: str = "raw", layers_per_chunk: int = 1, **prefill_args):
        config = dict(num_kv_blocks=64, block_size=BLOCK, max_num_batched_tokens=32)
        self.prefill = LLMEngine(EngineConfig(**(config | prefill_args)), loaded=loaded)
        self.decode = LLMEngine(EngineConfig(**config), loaded=loaded)
        self.ingest = KVIngest(self.decode.runner.kv_cache, BLOCK)
        self.receiver = make_receiver(backend, self.ingest)
        self.backend, self.codec = backend, codec
        self.senders = []

        def sender(backend: str, endpoint: str):
            self.senders.append(make_sender(backend, endpoint, timeout_s=5.0))
            return self.senders[-1]

        self.streamer = KVStreamer("prefill-0", self.prefill.runner.kv_cache, BLOCK, sender, layers_per_chunk)
        self.prefill.kv_exporter = self.Recorder(self.streamer)
        self.completed: set[str] = set()
        self.reports: dict[str, HandoffReport] = {}
        self.starts: dict[str, int] = {}  # each handoff's start_token

    class Recorder:
        """Wraps the streamer to remember each request's source block table."""

        def __init__(self, streamer: KVStreamer):
            self.streamer = streamer
            self.tables: dict[str, tuple[int, ...]] = {}

        def begin_step(self, slices: list[KVSlice]):
            for s in slices:
                self.tables[s.request_id] = s.block_table
            return self.streamer.begin_step(slices)

    def close(self) -> None:
        self.streamer.close()
        self.receiver.stop()

    def handoff(self, request_id: str, prompt, params: SamplingParams):
        """Reserve, prefill with streaming, wait for the acks; return the prefill output."""
        reservation = self.decode.reserve(prompt, params, request_id)
        n = len(self.decode._outputs[request_id].request.prompt_token_ids)
        start = self.starts[request_id] = reservation.num_cached_tokens
        self.ingest.expect(request_id, reservation.block_ids, n, lambda: self.completed.add(request_id), start)
        self.streamer.route(request_id, KVDestination("decode-0", self.backend, self.receiver.endpoint,
                                                      reservation.block_ids, self.codec, start))
        self.prefill.add_request(prompt, params, request_id, export_kv=True)
        first = None
        while self.prefill.has_unfinished_requests():
            for out in self.prefill.step():
                if out.request_id == request_id:
                    first = out
        assert first is not None
        self.reports[request_id] = self.streamer.finish(request_id, timeout_s=10)
        return first

    def run(self, prompts, params: SamplingParams, prefix: str = "r") -> dict[str, list[int]]:
        """Hand every prompt off (request ids ``prefix`` + index), then decode them all as one batch."""
        results = {}
        for i, prompt in enumerate(prompts):
            rid = f"{prefix}{i}"
            first = self.handoff(rid, prompt, params)
            assert rid in self.completed, "all layers of all tokens arrived"
            if first.finished:  # the first token ended it: release the reservation
                self.decode.abort(rid)
                results[rid] = list(first.token_ids)
                continue
            out = self.decode.start_reserved(rid, first.token_ids[0], first.generator_state)
            assert out.new_text == first.new_text
            results[rid] = list(out.token_ids)
        while self.decode.has_unfinished_requests():
            for out in self.decode.step():
                results[out.request_id] = list(out.token_ids)
        return results


@pytest.fixture(params=["collective", "grpc"])
def pair(request, loaded):
    p = Pair(loaded, request.param)
    yield p
    p.close()


def idle(engine: LLMEngine) -> bool:
    return engine.block_pool.num_free_blocks == engine.block_pool.num_blocks and engine.num_reserved == 0


def test_handoff_output_equals_offline_engine(pair, llm):
    params = SamplingParams(max_tokens=24, temperature=0)
    expected = [o.token_ids for o in llm.generate(PROMPTS, params)]
    results = pair.run(PROMPTS, params)
    assert [results[f"r{i}"] for i in range(len(PROMPTS))] == expected
    assert idle(pair.prefill) and idle(pair.decode)


def test_received_kv_equals_computed_kv_bitwise(pair):
    # 90 tokens: six blocks, three prefill chunks of 32 tokens.
    prompt = list(range(1000, 1090))
    first = pair.handoff("long", prompt, SamplingParams(max_tokens=4, temperature=0))
    assert "long" in pair.completed
    src = pair.prefill.kv_exporter.tables["long"]
    dst = pair.decode.kv_cache.block_table("long")
    layers = (0, pair.prefill.model_config.num_layers)
    computed = gather_kv(pair.prefill.runner.kv_cache, layers, src[:6], (0, 90), BLOCK)
    received = gather_kv(pair.decode.runner.kv_cache, layers, dst[:6], (0, 90), BLOCK)
    assert torch.equal(computed, received)
    assert computed.abs().sum() > 0
    pair.decode.abort("long")
    assert first.token_ids and idle(pair.decode)


def test_prefix_cache_hit_on_the_prefill_side_still_sends_every_token(loaded, llm):
    p = Pair(loaded, "collective")
    try:
        params = SamplingParams(max_tokens=8, temperature=0)
        prompt = PROMPTS[5] * 2  # long enough for several full blocks
        expected = llm.generate([prompt], params)[0].token_ids
        p.run([prompt], params, "cold")  # warms the prefill side's prefix cache
        p.decode.block_pool.reset_prefix_cache()  # the decode side has nothing cached: all must travel
        assert p.prefill.kv_cache.find_prefix(p.prefill.tokenizer.encode(prompt))  # the hit is real
        results = p.run([prompt], params)
        assert results["r0"] == expected
        assert p.starts["r0"] == 0 and p.reports["r0"].num_bytes == p.reports["cold0"].num_bytes
        assert idle(p.prefill) and idle(p.decode)
    finally:
        p.close()


@pytest.mark.parametrize("layers_per_chunk", [4, 30])
def test_layer_groups(loaded, llm, layers_per_chunk):
    p = Pair(loaded, "collective", layers_per_chunk=layers_per_chunk)
    try:
        params = SamplingParams(max_tokens=12, temperature=0)
        expected = [o.token_ids for o in llm.generate(PROMPTS[:3], params)]
        results = p.run(PROMPTS[:3], params)
        assert [results[f"r{i}"] for i in range(3)] == expected
    finally:
        p.close()


def test_seeded_sampling_continues_the_same_random_stream(pair, llm):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    expected = [o.token_ids for o in llm.generate(PROMPTS[:4], params)]
    results = pair.run(PROMPTS[:4], params)
    assert [results[f"r{i}"] for i in range(4)] == expected


def test_fp16_codec_keeps_greedy_output(loaded, llm):
    p = Pair(loaded, "collective", codec="fp16")
    try:
        params = SamplingParams(max_tokens=16, temperature=0)
        expected = [o.token_ids for o in llm.generate(PROMPTS[:4], params)]
        results = p.run(PROMPTS[:4], params)
        assert [results[f"r{i}"] for i in range(4)] == expected
    finally:
        p.close()


def test_first_token_that_ends_the_request(pair):
    first = pair.handoff("one", PROMPTS[0], SamplingParams(max_tokens=1, temperature=0))
    assert first.finished and first.finish_reason == "length"
    pair.decode.abort("one")  # the router releases the reservation
    assert idle(pair.prefill) and idle(pair.decode)


def test_chunk_for_a_cancelled_reservation_is_refused_and_blocks_stay_free(pair):
    prompt = list(range(2000, 2040))
    table = pair.decode.reserve(prompt, SamplingParams(max_tokens=4), "gone").block_ids
    pair.ingest.expect("gone", table, len(prompt), lambda: None)
    pair.ingest.cancel("gone")
    pair.decode.abort("gone")
    assert idle(pair.decode)
    pair.streamer.route("gone", KVDestination("decode-0", pair.backend, pair.receiver.endpoint, table))
    pair.prefill.add_request(prompt, SamplingParams(max_tokens=4), "gone", export_kv=True)
    while pair.prefill.has_unfinished_requests():
        pair.prefill.step()
    with pytest.raises(TransferError, match="holds no reserved blocks"):
        pair.streamer.finish("gone", timeout_s=10)
    assert idle(pair.prefill) and idle(pair.decode)
    # The pair still works afterwards.
    results = pair.run([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0))
    assert len(results["r0"]) == 4


def test_stalled_receiver_fails_the_send_within_its_deadline(loaded):
    p = Pair(loaded, "grpc")
    try:
        p.senders.clear()
        prompt = list(range(3000, 3020))
        table = p.decode.reserve(prompt, SamplingParams(max_tokens=4), "slow").block_ids
        p.ingest.expect("slow", table, len(prompt), lambda: None)
        p.ingest.inject_stall(2.0, num_chunks=1)
        p.streamer._make_sender = lambda b, e: make_sender(b, e, timeout_s=0.5, max_retries=0)
        p.streamer.route("slow", KVDestination("decode-0", "grpc", p.receiver.endpoint, table))
        p.prefill.add_request(prompt, SamplingParams(max_tokens=4), "slow", export_kv=True)
        while p.prefill.has_unfinished_requests():
            p.prefill.step()
        start = time.monotonic()
        # The send's own 0.5 s deadline fails it, long before finish would give up waiting
        # ("not acknowledged within 60 s").
        with pytest.raises(TransferError, match="no ack before the deadline"):
            p.streamer.finish("slow", timeout_s=60)
        assert time.monotonic() - start < 10
        p.ingest.cancel("slow")
        p.decode.abort("slow")
        assert idle(p.prefill) and idle(p.decode)
    finally:
        p.close()


def test_reserve_refuses_cleanly_when_full(loaded):
    engine = LLMEngine(EngineConfig(num_kv_blocks=4, block_size=BLOCK), loaded=loaded)
    reservation = engine.reserve(list(range(100, 140)), SamplingParams(max_tokens=4), "a")
    assert len(reservation.block_ids) == 3 and reservation.num_cached_tokens == 0
    with pytest.raises(CapacityError, match="KV blocks"):
        engine.reserve(list(range(100, 140)), SamplingParams(max_tokens=4), "b")
    with pytest.raises(ValueError, match="empty"):
        engine.reserve([], SamplingParams(max_tokens=4), "c")
    with pytest.raises(ValueError, match="no reservation"):
        engine.start_reserved("nope", 5)
    with pytest.raises(ValueError, match="first_token_id"):
        engine.start_reserved("a", -1)
    engine.abort("a")
    assert idle(engine)
    assert engine.reserve(list(range(100, 140)), SamplingParams(max_tokens=4), "b")


# ----------------------------------------------------------- decode-side prefix reuse

SHARED_BLOCKS = 3  # the prompts below share 60 tokens: three whole blocks of 16


def shared_prefix_prompts(tokenizer) -> list[list[int]]:
    """Two prompts with a 60-token prefix in common and different tails."""
    prefix = [t for p in (PROMPTS[5], PROMPTS[4], PROMPTS[2]) for t in tokenizer.encode(p)]
    assert len(prefix) == 60
    return [prefix + tokenizer.encode(PROMPTS[0]), prefix + tokenizer.encode(PROMPTS[6])]


def kv_bytes_per_token(engine: LLMEngine) -> int:
    cache = engine.runner.kv_cache  # [layers, 2, slots, kv_heads, head_dim]
    return cache.shape[0] * 2 * cache.shape[3] * cache.shape[4] * cache.element_size()


def test_decode_side_prefix_hit_receives_only_the_tail(pair, llm):
    params = SamplingParams(max_tokens=16, temperature=0)
    prompts = shared_prefix_prompts(llm.tokenizer)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    first = pair.run(prompts[:1], params, "a")  # the decode side caches the prompt's blocks
    pair.prefill.block_pool.reset_prefix_cache()  # the prefill side computes the whole prompt again
    second = pair.run(prompts[1:], params, "b")
    assert [first["a0"], second["b0"]] == expected
    start = SHARED_BLOCKS * BLOCK
    assert pair.starts == {"a0": 0, "b0": start}
    per_token = kv_bytes_per_token(pair.decode)
    assert pair.reports["a0"].num_bytes == len(prompts[0]) * per_token
    assert pair.reports["b0"].num_bytes == (len(prompts[1]) - start) * per_token
    assert idle(pair.prefill) and idle(pair.decode)


def test_a_shared_prefix_reservation_aborted_before_or_after_its_kv_landed_leaks_nothing(pair, llm):
    params = SamplingParams(max_tokens=8, temperature=0)
    prompts = shared_prefix_prompts(llm.tokenizer)
    pair.run(prompts[:1], params, "warm")
    cached = pair.decode.kv_cache.find_prefix(prompts[1])
    assert len(cached) == SHARED_BLOCKS
    before = pair.decode.reserve(prompts[1], params, "before")  # no KV sent yet
    assert before.block_ids[:SHARED_BLOCKS] == tuple(cached)
    pair.decode.abort("before")
    assert idle(pair.decode)
    pair.handoff("after", prompts[1], params)  # every chunk landed; it never started decoding
    assert "after" in pair.completed and pair.starts["after"] == SHARED_BLOCKS * BLOCK
    pair.ingest.cancel("after")
    pair.decode.abort("after")
    assert idle(pair.prefill) and idle(pair.decode)
    assert pair.decode.kv_cache.find_prefix(prompts[1]) == cached  # still cached, for the next one
    expected = llm.generate(prompts[1:], params)[0].token_ids
    assert pair.run(prompts[1:], params, "again") == {"again0": expected}
    assert idle(pair.decode)


def test_a_chunk_for_the_cached_prefix_is_refused_and_the_shared_blocks_keep_their_kv(pair, llm):
    params = SamplingParams(max_tokens=4, temperature=0)
    prompts = shared_prefix_prompts(llm.tokenizer)
    pair.run(prompts[:1], params, "warm")
    reservation = pair.decode.reserve(prompts[1], params, "stale")
    start = reservation.num_cached_tokens
    layers, shared_blocks = (0, pair.decode.model_config.num_layers), reservation.block_ids[:SHARED_BLOCKS]
    shared_kv = gather_kv(pair.decode.runner.kv_cache, layers, shared_blocks, (0, start), BLOCK)
    pair.ingest.expect("stale", reservation.block_ids, len(prompts[1]), lambda: None, start)
    # A sender that ignores the start sends every position, the shared prefix's too.
    pair.streamer.route("stale", KVDestination("decode-0", pair.backend, pair.receiver.endpoint,
                                               reservation.block_ids))
    pair.prefill.add_request(prompts[1], params, "stale", export_kv=True)
    while pair.prefill.has_unfinished_requests():
        pair.prefill.step()
    with pytest.raises(TransferError, match="cached prefix"):
        pair.streamer.finish("stale", timeout_s=10)
    assert torch.equal(gather_kv(pair.decode.runner.kv_cache, layers, shared_blocks, (0, start), BLOCK), shared_kv)
    pair.ingest.cancel("stale")
    pair.decode.abort("stale")
    assert idle(pair.prefill) and idle(pair.decode)
    with pytest.raises(ValueError, match="start_token"):
        KVDestination("decode-0", pair.backend, pair.receiver.endpoint, reservation.block_ids, start_token=-1)
    with pytest.raises(ValueError, match="start_token"):
        pair.ingest.expect("whole", reservation.block_ids, 16, lambda: None, 16)
