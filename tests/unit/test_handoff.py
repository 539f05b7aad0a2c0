"""The KV handoff between two engines in one process, over the real transfer backends.

A prefill engine (``export_kv``) streams through a ``KVStreamer`` into blocks a decode engine
reserved (``KVIngest`` behind a real receiver), and the decode engine finishes the request.
The output must equal the offline engine's, and the K/V that arrived must equal the K/V the
prefill side computed.
"""

from __future__ import annotations

import time

import pytest
import torch

from splitserve.config import EngineConfig
from splitserve.engine.engine import KVSlice, LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import CapacityError
from splitserve.transfer import TransferError, gather_kv, make_receiver, make_sender
from splitserve.protocol import KVDestination
from splitserve.transfer.handoff import KVIngest, KVStreamer
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
        table = self.decode.reserve(prompt, params, request_id)
        n = len(self.decode._outputs[request_id].request.prompt_token_ids)
        self.ingest.expect(request_id, table, n, lambda: self.completed.add(request_id))
        self.streamer.route(request_id, KVDestination("decode-0", self.backend, self.receiver.endpoint,
                                                      tuple(table), self.codec))
        self.prefill.add_request(prompt, params, request_id, export_kv=True)
        first = None
        while self.prefill.has_unfinished_requests():
            for out in self.prefill.step():
                if out.request_id == request_id:
                    first = out
        assert first is not None
        self.streamer.finish(request_id, timeout_s=10)
        return first

    def run(self, prompts, params: SamplingParams) -> dict[str, list[int]]:
        """Hand every prompt off, then decode them all as one batch."""
        results = {}
        for i, prompt in enumerate(prompts):
            rid = f"r{i}"
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
        p.run([prompt], params)  # warms the prefill side's prefix cache
        p.completed.clear()
        assert p.prefill.kv_cache.find_prefix(p.prefill.tokenizer.encode(prompt))  # the hit is real
        results = p.run([prompt], params)
        assert results["r0"] == expected
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
    table = pair.decode.reserve(prompt, SamplingParams(max_tokens=4), "gone")
    pair.ingest.expect("gone", table, len(prompt), lambda: None)
    pair.ingest.cancel("gone")
    pair.decode.abort("gone")
    assert idle(pair.decode)
    pair.streamer.route("gone", KVDestination("decode-0", pair.backend, pair.receiver.endpoint, tuple(table)))
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
        table = p.decode.reserve(prompt, SamplingParams(max_tokens=4), "slow")
        p.ingest.expect("slow", table, len(prompt), lambda: None)
        p.ingest.inject_stall(2.0, num_chunks=1)
        p.streamer._make_sender = lambda b, e: make_sender(b, e, timeout_s=0.5, max_retries=0)
        p.streamer.route("slow", KVDestination("decode-0", "grpc", p.receiver.endpoint, tuple(table)))
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
    table = engine.reserve(list(range(100, 140)), SamplingParams(max_tokens=4), "a")
    assert len(table) == 3
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
