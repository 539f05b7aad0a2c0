"""The OpenAI-compatible HTTP front end: request conversion as pure functions, and an HttpServer on
a free port over a real LLMEngine, driven with the ``openai`` client (output identical to the
offline LLM, streaming and not, chat, usage, models, health, error statuses, a client that
disconnects aborting the engine request, /metrics)."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine, LoadedModel
from splitserve.engine.sampling_params import SamplingParams
from splitserve.protos.splitserve.v1 import serving_pb2 as pb
from splitserve.errors import CapacityError, ServingError
from splitserve.protocol import GenerateDelta, RequestReport, SLO
from splitserve.router.api import GenerateInput
from splitserve.router.http_server import HttpServer, headers_for_error, status_for_error
from splitserve.router.metrics import Metrics
from splitserve.router.openai_protocol import (
    CHAT_DEFAULT_MAX_TOKENS, Reply, ReplyOptions, chat_input, completion_input, error_body,
)
from tests.conftest import PROMPTS
from tests.unit.frontend_helpers import MODEL_NAME, EngineFrontend, LoopThread

MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


# --------------------------------------------------------------------- pure conversion


def test_completion_body_converts():
    body = {"model": "m", "prompt": "Hi", "max_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": 7, "seed": 3,
            "stop": "\n", "ignore_eos": True, "num_speculative_tokens": 2, "slo_ttft_ms": 250, "slo_tpot_ms": 40,
            "stream": True, "stream_options": {"include_usage": True}, "user": "ignored"}
    assert completion_input(body, "r-1") == (GenerateInput(
        params=SamplingParams(max_tokens=5, temperature=0, top_p=0.5, top_k=7, seed=3, stop=("\n",),
                              ignore_eos=True, num_speculative_tokens=2),
        prompt="Hi", model="m", request_id="r-1", slo=SLO(ttft_s=0.25, tpot_s=0.04),
    ), ReplyOptions(stream=True, include_usage=True))


def test_unset_and_null_fields_take_sampling_params_defaults():
    generate_input, options = completion_input({"prompt": "Hi", "max_tokens": None, "top_k": -1})
    assert (generate_input.params, generate_input.model, options) == (SamplingParams(), None, ReplyOptions())


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2, 3]]])
def test_token_id_prompts(prompt):
    assert completion_input({"prompt": prompt})[0].prompt_token_ids == [1, 2, 3]


def test_what_vllm_bench_serve_sends_is_accepted():
    body = {"model": "m", "prompt": "Hi", "repetition_penalty": 1.0, "max_tokens": 8, "logprobs": None,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    assert completion_input(body)[0].params == SamplingParams(max_tokens=8, ignore_eos=True)
    chat = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_completion_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    generate_input, _ = chat_input(chat)
    assert (generate_input.messages, generate_input.params.max_tokens) == ([{"role": "user", "content": "Hi"}], 8)


@pytest.mark.parametrize(("stream_options", "expected"), [
    ({"include_usage": True, "continuous_usage_stats": True}, ReplyOptions(True, True, continuous_usage=True)),
    ({"include_usage": True, "continuous_usage_stats": False}, ReplyOptions(True, True)),
    ({"continuous_usage_stats": True}, ReplyOptions(True)),  # as vLLM: only with include_usage
])
def test_continuous_usage_stats(stream_options: dict[str, bool], expected: ReplyOptions):
    assert completion_input({"prompt": "Hi", "stream": True, "stream_options": stream_options})[1] == expected


def test_chat_max_tokens():
    messages = [{"role": "user", "content": "Hi", "name": "dropped"}]
    assert chat_input({"messages": messages})[0] == GenerateInput(
        params=SamplingParams(max_tokens=CHAT_DEFAULT_MAX_TOKENS), messages=[{"role": "user", "content": "Hi"}])
    assert chat_input({"messages": messages, "max_tokens": 3})[0].params.max_tokens == 3
    assert chat_input({"messages": messages, "max_tokens": 3, "max_completion_tokens": 4})[0].params.max_tokens == 4


@pytest.mark.parametrize(("body", "fragment"), [
    ([], "must be a JSON object"),
    ({}, "prompt must be a string or a list of token ids, got NoneType"),
    ({"prompt": []}, "prompt must not be empty"),
    ({"prompt": ["a", "b"]}, "batched prompts are not supported"),
    ({"prompt": [1, "a"]}, "prompt must be a string or a list of token ids"),
    ({"prompt": "a", "n": 2}, "n=2 is not supported"),
    ({"prompt": "a", "echo": True}, "echo=True is not supported"),
    ({"prompt": "a", "logprobs": 1}, "logprobs=1 is not supported"),
    ({"prompt": "a", "best_of": 3}, "best_of=3 is not supported"),
    ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty=0.5 is not supported"),
    ({"prompt": "a", "temperature": -1}, "temperature must be >= 0"),
    ({"prompt": "a", "temperature": "hot"}, "temperature must be int or float, got 'hot'"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens must be int, got True"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens must be a positive integer"),
    ({"prompt": "a", "stop": 5}, "stop must be a string or a list of strings"),
    ({"prompt": "a", "stop": [""]}, "stop strings must not be empty"),
    ({"prompt": "a", "slo_ttft_ms": 0}, "slo_ttft_ms must be a positive number"),
    ({"prompt": "a", "stream": "yes"}, "stream must be a boolean"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "only allowed when stream is true"),
    ({"prompt": "a", "model": 3}, "model must be a string"),
])
def test_bad_completion_bodies_raise_value_error_with_a_sentence(body: Any, fragment: str):
    with pytest.raises(ValueError) as info:
        completion_input(body)
    assert fragment in str(info.value)


@pytest.mark.parametrize(("messages", "fragment"), [
    (None, "messages must be a non-empty list"),
    ([], "messages must be a non-empty list"),
    (["hi"], "messages[0] must be an object with a string role"),
    ([{"role": "user", "content": None}], "messages[0].content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text parts"),
])
def test_bad_messages(messages: Any, fragment: str):
    with pytest.raises(ValueError) as info:
        chat_input({"messages": messages})
    assert fragment in str(info.value)


def test_reply_shapes():
    first = GenerateDelta("r", [1], "Hel", num_prompt_tokens=3, num_output_tokens=1)
    last = GenerateDelta("r", [2], "lo", True, "length", num_prompt_tokens=3, num_output_tokens=2)
    chat = Reply(True, "r", "m", 7, include_usage=True)
    assert chat.chunk(first, is_first=True) == {
        "id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 7, "model": "m", "usage": None,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "logprobs": None,
                     "finish_reason": None}]}
    assert chat.chunk(last, is_first=False)["choices"][0] == {
        "index": 0, "delta": {"content": "lo"}, "logprobs": None, "finish_reason": "length"}
    assert chat.usage_chunk(last) == {"id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 7,
                                      "model": "m", "choices": [],
                                      "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    continuous = Reply(False, "r", "m", 7, include_usage=True, continuous_usage=True)
    assert continuous.chunk(last, is_first=False)["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    completion = Reply(False, "r", "m", 7)
    assert completion.chunk(first, is_first=True) == {
        "id": "cmpl-r", "object": "text_completion", "created": 7, "model": "m",
        "choices": [{"index": 0, "text": "Hel", "logprobs": None, "finish_reason": None}]}
    assert completion.response("Hello", last)["choices"] == [
        {"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "length"}]
    assert chat.response("Hello", last)["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}


def test_the_last_chunk_carries_the_request_report():
    report = RequestReport(prefill_worker="p-0", decode_worker="d-0", k_history=(3, 1), num_draft_tokens=4,
                           num_accepted_tokens=2, queue_s=0.1, prefill_s=0.2, transfer_s=0.01, decode_s=1.5,
                           handoff_attempts=1, placement="remote", predicted_ttft_s=0.25, predicted_tpot_s=0.05,
                           ttft_s=0.3, tpot_s=0.06)
    first = GenerateDelta("r", [1], "Hel", num_prompt_tokens=3, num_output_tokens=1)
    last = GenerateDelta("r", [2], "lo", True, "length", num_prompt_tokens=3, num_output_tokens=2, report=report)
    reply = Reply(False, "r", "m", 7)
    assert "splitserve_report" not in reply.chunk(first, is_first=True)
    wire = {"prefill_worker": "p-0", "decode_worker": "d-0", "k_history": [3, 1], "draft_tokens": 4,
            "accepted_tokens": 2, "queue_s": 0.1, "prefill_s": 0.2, "transfer_s": 0.01, "decode_s": 1.5,
            "handoff_attempts": 1, "placement": "remote", "predicted_ttft_s": 0.25, "predicted_tpot_s": 0.05,
            "ttft_s": 0.3, "tpot_s": 0.06, "migrations": 0}
    assert reply.chunk(last, is_first=False)["splitserve_report"] == wire
    assert reply.response("Hello", last)["splitserve_report"] == wire
    assert set(wire) == {f.name for f in pb.RequestReport.DESCRIPTOR.fields}  # the gRPC message's names


@pytest.mark.parametrize(("error", "status"), [
    (ValueError("bad"), 400), (CapacityError("full"), 429), (ServingError("died"), 503), (KeyError("x"), 500),
])
def test_status_for_error(error: Exception, status: int):
    assert status_for_error(error)[0] == status
    assert error_body(status, "m")["error"]["message"] == "m"


@pytest.mark.parametrize(("error", "headers"), [
    (CapacityError("full", retry_after_s=1.2), {"Retry-After": "2"}),  # whole seconds, rounded up
    (CapacityError("full", retry_after_s=3.0), {"Retry-After": "3"}),
    (CapacityError("full", retry_after_s=0.0), {"Retry-After": "1"}),  # at least 1
    (CapacityError("full"), {}),
    (ServingError("died"), {}),
])
def test_headers_for_error(error: Exception, headers: dict[str, str]):
    assert headers_for_error(error) == headers


class Answer:
    """A raw HTTP answer: status, headers, body."""

    def __init__(self, status: int, headers: Any, body: bytes):
        self.status_code, self.headers, self.content = status, headers, body

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self) -> Any:
        return json.loads(self.content)


def fetch(url: str, body: bytes | dict[str, Any] | None = None) -> Answer:
    """GET (no body) or POST with urllib; error statuses are answers too."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Answer(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, error.headers, error.read())


def open_stream(url: str, path: str, body: dict[str, Any]) -> tuple[http.client.HTTPConnection,
                                                                      http.client.HTTPResponse]:
    """A POST whose answer the caller reads line by line (SSE)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return connection, connection.getresponse()


# ------------------------------------------------------------------- a served engine


class Served:
    def __init__(self, loop: LoopThread, server: HttpServer, frontend: EngineFrontend, port: int):
        self.loop, self.server, self.frontend, self.engine = loop, server, frontend, frontend.engine
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served(loaded: LoadedModel) -> Iterator[Served]:
    loop = LoopThread()
    # A small cache (about 1.4k tokens) is plenty here and spares the shared machine's memory.
    frontend = EngineFrontend(LLMEngine(EngineConfig(kv_cache_bytes=64 << 20), loaded=loaded))
    server = HttpServer(frontend, Metrics())

    async def start() -> tuple[int, asyncio.Task[None]]:
        return await server.start("127.0.0.1", 0), asyncio.create_task(frontend.run())

    port, step_loop = loop.run(start())
    served = Served(loop, server, frontend, port)
    yield served
    served.client.close()

    async def stop() -> None:
        await server.stop(0)
        step_loop.cancel()
        await asyncio.wait([step_loop])

    loop.run(stop())
    loop.close()


def assert_engine_idle(engine: LLMEngine, timeout_s: float = 30.0) -> None:
    """No request left and every KV block back in the pool (aborts land between steps)."""
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_unfinished_requests()
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks


def scrape(served: Served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by (name, sorted labels)."""
    response = fetch(f"{served.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_completion_equals_the_offline_llm(served: Served, llm, prompt: str):
    expected = llm.generate(prompt, GREEDY)[0]
    for sent in (prompt, llm.tokenizer.encode(prompt)):
        completion = served.client.completions.create(model=MODEL_NAME, prompt=sent, max_tokens=MAX_TOKENS,
                                                      temperature=0)
        assert completion.object == "text_completion" and completion.model == MODEL_NAME
        assert (completion.choices[0].text, completion.choices[0].finish_reason) == (expected.text, "length")
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens,
                completion.usage.total_tokens) == (len(expected.prompt_token_ids), MAX_TOKENS,
                                                   len(expected.prompt_token_ids) + MAX_TOKENS)
    assert_engine_idle(served.engine)


def test_streamed_completion_equals_the_offline_llm(served: Served, llm):
    expected = llm.generate(PROMPTS[2], GREEDY)[0]
    chunks = list(served.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=MAX_TOKENS,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True}))
    *token_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in token_chunks) == expected.text
    assert [c.choices[0].finish_reason for c in token_chunks][-1] == "length"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert usage_chunk.choices == []
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (
        len(expected.prompt_token_ids), MAX_TOKENS)


def test_continuous_usage_counts_every_chunks_tokens(served: Served):
    chunks = list(served.client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    *token_chunks, usage_chunk = chunks
    counts = [c.usage.completion_tokens for c in token_chunks]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == MAX_TOKENS
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == MAX_TOKENS


def test_stream_without_include_usage_has_no_usage(served: Served):
    chunks = list(served.client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=3, temperature=0,
                                                   stream=True))
    assert chunks and all(c.usage is None and len(c.choices) == 1 for c in chunks)


def test_streamed_chat_equals_chat_template_plus_offline_generate(served: Served, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name one primary color."}]
    prompt_ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    expected = llm.generate(prompt_ids, GREEDY)[0]
    chunks = list(served.client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_completion_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    *token_chunks, usage_chunk = chunks
    assert token_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in token_chunks) == expected.text
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].id.startswith("chatcmpl-")
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (len(prompt_ids), MAX_TOKENS)


def test_chat_completion(served: Served, llm):
    messages = [{"role": "user", "content": "Hi!"}]
    expected = llm.chat(messages, SamplingParams(max_tokens=40, temperature=0.0))[0]
    response = served.client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=40,
                                                     temperature=0)
    choice = response.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", expected.text)
    assert choice.finish_reason == str(expected.finish_reason)
    assert response.usage.completion_tokens == len(expected.token_ids)


def test_models_lists_the_served_model(served: Served):
    assert [m.id for m in served.client.models.list().data] == [MODEL_NAME]


def test_health_follows_is_ready_and_livez_only_the_process(served: Served):
    assert fetch(f"{served.url}/health").status_code == 200
    served.frontend.ready = False
    try:
        assert fetch(f"{served.url}/health").status_code == 503
        assert fetch(f"{served.url}/livez").status_code == 200  # not ready, yet alive: no restart
    finally:
        served.frontend.ready = True


BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("empty prompt", {"prompt": ""}, "prompt must not be empty"),
    ("temperature < 0", {"prompt": "Hi", "temperature": -1}, "temperature must be >= 0"),
    ("n = 2", {"prompt": "Hi", "n": 2}, "n=2 is not supported"),
    ("unknown model", {"prompt": "Hi", "model": "gpt-9"}, "'gpt-9' is not served here"),
    ("token outside vocab", {"prompt": [10**9]}, "outside the vocabulary"),
]


@pytest.mark.parametrize(("fields", "fragment"), [(f, m) for _, f, m in BAD_REQUESTS],
                         ids=[name for name, _, _ in BAD_REQUESTS])
def test_bad_requests_are_400_with_the_message(served: Served, fields: dict[str, Any], fragment: str):
    fields = {"model": MODEL_NAME, "max_tokens": MAX_TOKENS} | fields
    with pytest.raises(openai.BadRequestError) as info:
        served.client.completions.create(**fields)
    assert info.value.status_code == 400
    assert fragment in info.value.body["message"]
    assert info.value.body["type"] == "invalid_request_error"


def test_the_server_keeps_serving_after_errors(served: Served, llm):
    before = scrape(served)
    for _, fields, _ in BAD_REQUESTS:
        with pytest.raises(openai.BadRequestError):
            served.client.completions.create(**{"model": MODEL_NAME, "max_tokens": 2} | fields)
    raw = fetch(f"{served.url}/v1/completions", b"{not json")
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    missing = fetch(f"{served.url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    completion = served.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                                  temperature=0)
    assert completion.choices[0].text == llm.generate(PROMPTS[0], GREEDY)[0].text
    invalid = ("splitserve_requests_total", (("outcome", "invalid"),))
    assert scrape(served)[invalid] - before[invalid] == len(BAD_REQUESTS) + 1
    assert_engine_idle(served.engine)


@pytest.mark.parametrize(("error", "status", "exception", "retry_after"), [
    (CapacityError("no decode worker has 40 free blocks"), 429, openai.RateLimitError, None),
    (CapacityError("no decode worker has 40 free blocks", retry_after_s=1.2), 429, openai.RateLimitError, "2"),
    (ServingError("prefill-0 died"), 503, openai.InternalServerError, None),
    (ZeroDivisionError("a bug"), 500, openai.InternalServerError, None),
])
def test_frontend_errors_map_to_statuses(served: Served, error: Exception, status: int, exception: type,
                                         retry_after: str | None, caplog):
    served.frontend.fail_with = error
    try:
        with pytest.raises(exception) as info:
            served.client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
        with caplog.at_level(logging.ERROR):
            streamed = fetch(f"{served.url}/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "Hi"}], "stream": True})
    finally:
        served.frontend.fail_with = None
    assert info.value.status_code == status == streamed.status_code  # before the stream starts: a status
    assert info.value.response.headers.get("Retry-After") == streamed.headers.get("Retry-After") == retry_after
    assert str(error) in info.value.body["message"]
    logged = [r for r in caplog.records if r.name == "splitserve.router.http_server" and r.exc_info]
    assert len(logged) == 2 * (status == 500)  # only bugs leave a trace in the log
    served.client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)  # still serving


def test_disconnecting_mid_stream_aborts_the_engine_request(served: Served):
    closed_before = served.frontend.num_closed_early
    aborted = ("splitserve_requests_total", (("outcome", "aborted"),))
    before = scrape(served)[aborted]
    stream = served.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=400, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    assert served.engine.has_unfinished_requests()
    stream.close()  # closes the connection
    assert_engine_idle(served.engine)
    assert served.frontend.num_closed_early == closed_before + 1
    assert scrape(served)[aborted] == before + 1


def test_metrics_count_requests_and_time_them(served: Served):
    before = scrape(served)
    served.client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0)
    list(served.client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0,
                                          stream=True))
    after = scrape(served)

    def grew(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert grew("splitserve_time_to_first_token_seconds_count") == 2
    assert grew("splitserve_time_per_output_token_seconds_count") == 2
    assert grew("splitserve_e2e_request_latency_seconds_count") == 2
    assert grew("splitserve_requests_total", (("outcome", "finished"),)) == 2
    assert grew("splitserve_generation_tokens_total") == 6
    assert grew("splitserve_prompt_tokens_total") > 0
    assert after[("splitserve_time_to_first_token_seconds_sum", ())] > 0


def test_sse_wire_format(served: Served):
    """Exactly OpenAI's framing: `data: {json}` events separated by a blank line, then [DONE]."""
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, "temperature": 0, "stream": True}
    connection, response = open_stream(served.url, "/v1/completions", body)
    assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
    raw = response.read().decode()
    connection.close()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-2]][-1] == "length"


def test_start_refuses_a_port_in_use(served: Served):
    port = int(served.url.rsplit(":", 1)[1])
    with pytest.raises(ValueError, match="cannot listen on"):
        served.loop.run(HttpServer(served.frontend).start("127.0.0.1", port))


# -------------------------------------------------- scripted frontends: streams and stop


class ScriptedFrontend:
    """Yields one delta, then raises ``error`` or else waits forever; ``closed`` is set once its
    iterator has been closed."""

    model_name = MODEL_NAME

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.closed = asyncio.Event()

    def is_ready(self) -> bool:
        return True

    async def generate(self, request: GenerateInput):
        try:
            yield GenerateDelta("scripted", [1], "a", num_prompt_tokens=2, num_output_tokens=1)
            if self.error is not None:
                raise self.error
            await asyncio.Event().wait()
        finally:
            self.closed.set()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


def test_an_error_mid_stream_ends_it_with_an_error_event(loop_thread: LoopThread):
    server = HttpServer(ScriptedFrontend(ServingError("decode-3 died")))
    port = loop_thread.run(server.start("127.0.0.1", 0))
    try:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0) as client:
            stream = iter(client.completions.create(model=MODEL_NAME, prompt="Hi", stream=True))
            assert next(stream).choices[0].text == "a"
            with pytest.raises(openai.APIError, match="decode-3 died"):
                next(stream)
        failed = ("splitserve_requests_total", {"outcome": "failed"})
        assert [s.value for f in text_string_to_metric_families(server.metrics.render().decode())
                for s in f.samples if (s.name, s.labels) == failed] == [1.0]
    finally:
        loop_thread.run(server.stop(0))


def test_stop_refuses_new_requests_then_cancels_running_ones(loop_thread: LoopThread):
    frontend = ScriptedFrontend()
    server = HttpServer(frontend)
    url = f"http://127.0.0.1:{loop_thread.run(server.start('127.0.0.1', 0))}"
    connection, running = open_stream(url, "/v1/completions", {"prompt": "Hi", "stream": True})
    assert running.readline().startswith(b"data: {")
    stopping = asyncio.run_coroutine_threadsafe(server.stop(grace_s=3), loop_thread.loop)
    # Within the grace period (the running stream never ends by itself): health turns 503 ...
    deadline = time.monotonic() + 10
    while (health := fetch(f"{url}/health").status_code) != 503 and time.monotonic() < deadline:
        assert health == 200 and not stopping.done()
        time.sleep(0.01)
    assert health == 503 and not stopping.done()
    refused = fetch(f"{url}/v1/completions", {"prompt": "Hi"})  # ... and new requests are refused
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    stopping.result(30)
    assert loop_thread.run(asyncio.wait_for(frontend.closed.wait(), 30)) is True
    connection.close()
    with pytest.raises(urllib.error.URLError):
        fetch(f"{url}/health")
