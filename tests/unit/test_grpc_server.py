"""The gRPC front end: proto <-> GenerateInput conversion, and a GrpcServer on a free port over a
real LLMEngine (output identical to the offline LLM, error statuses, cancellation aborting the
engine request, health, reflection, the ``splitserve client`` command)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from splitserve import cli
from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine, LoadedModel
from splitserve.engine.sampling_params import SamplingParams
from splitserve.protos.splitserve.v1 import serving_pb2 as pb
from splitserve.errors import CapacityError, ServingError
from splitserve.protocol import GenerateDelta, SLO
from splitserve.router.api import GenerateInput
from splitserve.router.client import GenerationClient, make_request, pushback_s
from splitserve.router.grpc_server import (
    GENERATION_SERVICE, GrpcServer, delta_to_pb, input_from_pb, status_for_error, trailers_for_error,
)
from tests.conftest import PROMPTS
from tests.unit.frontend_helpers import MODEL_NAME, EngineFrontend, LoopThread

MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --------------------------------------------------------------------- pure conversion


def test_unset_sampling_fields_take_sampling_params_defaults():
    generate_input = input_from_pb(pb.GenerateRequest(prompt="hi"))
    assert generate_input == GenerateInput(params=SamplingParams(), prompt="hi")


def test_make_request_sends_only_what_is_given():
    request = make_request("hi", temperature=0.0, ignore_eos=False)
    assert [f.name for f, _ in request.ListFields()] == ["prompt", "temperature", "ignore_eos"]


def test_every_field_converts():
    request = make_request(
        prompt_token_ids=[1, 2, 3], model="m", request_id="r-1", max_tokens=5, temperature=0.0, top_p=0.5,
        top_k=7, seed=-3, stop=["\n\n"], stop_token_ids=[9], ignore_eos=True, skip_special_tokens=False,
        num_speculative_tokens=0, ttft_ms=250, tpot_ms=40,
    )
    assert input_from_pb(pb.GenerateRequest.FromString(request.SerializeToString())) == GenerateInput(
        params=SamplingParams(max_tokens=5, temperature=0.0, top_p=0.5, top_k=7, seed=-3, stop=("\n\n",),
                              stop_token_ids=(9,), ignore_eos=True, skip_special_tokens=False,
                              num_speculative_tokens=0),
        prompt_token_ids=[1, 2, 3], model="m", request_id="r-1", slo=SLO(ttft_s=0.25, tpot_s=0.04),
    )


def test_messages_convert_to_dicts():
    request = make_request(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": ""}])
    assert input_from_pb(request).messages == [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": ""}]


def test_an_empty_prompt_counts_as_given():
    """Presence, not truthiness: "" reaches the router, which refuses it with its own sentence."""
    assert input_from_pb(make_request("")).prompt == ""


@pytest.mark.parametrize(("request_", "fragment"), [
    (make_request(), "got none"),
    (make_request("a", prompt_token_ids=[1]), "got prompt and prompt_token_ids"),
    (make_request(prompt_token_ids=[1], messages=[{"role": "user", "content": "a"}]),
     "got prompt_token_ids and messages"),
    (make_request("a", temperature=-0.5), "temperature must be >= 0"),
    (make_request("a", top_p=0.0), "top_p must be in (0, 1]"),
    (make_request("a", max_tokens=0), "max_tokens must be a positive integer"),
    (make_request("a", top_k=0), "top_k must be None or an integer >= 1"),
    (make_request("a", stop=[""]), "stop strings must not be empty"),
    (make_request("a", ttft_ms=0), "slo.ttft_ms must be positive"),
    (make_request("a", tpot_ms=float("nan")), "slo.tpot_ms must be positive"),
])
def test_bad_requests_raise_value_error_with_a_sentence(request_: pb.GenerateRequest, fragment: str):
    with pytest.raises(ValueError) as info:
        input_from_pb(request_)
    assert fragment in str(info.value)


def test_delta_to_pb():
    delta = GenerateDelta("r", [5, 6], "ab", finished=True, finish_reason="length", num_prompt_tokens=3,
                          num_output_tokens=4, num_draft_tokens=6, num_accepted_tokens=2)
    assert delta_to_pb(delta) == pb.GenerateResponse(
        request_id="r", token_ids=[5, 6], text="ab", finished=True, finish_reason="length",
        usage=pb.Usage(prompt_tokens=3, completion_tokens=4),
        speculation=pb.Speculation(draft_tokens=6, accepted_tokens=2),
    )
    assert delta_to_pb(GenerateDelta("r", [], "")).finish_reason == ""


class _BadMessages(ValueError):
    pass


@pytest.mark.parametrize(("error", "code", "details"), [
    (ValueError("prompt must not be empty"), grpc.StatusCode.INVALID_ARGUMENT, "prompt must not be empty"),
    (_BadMessages("message 0 needs a role"), grpc.StatusCode.INVALID_ARGUMENT, "message 0 needs a role"),
    (CapacityError("no free KV blocks"), grpc.StatusCode.RESOURCE_EXHAUSTED, "no free KV blocks"),
    (ServingError("decode-1 died"), grpc.StatusCode.UNAVAILABLE, "decode-1 died"),
    (KeyError("x"), grpc.StatusCode.INTERNAL, "the server failed on this request (KeyError: 'x')"),
    (RuntimeError(), grpc.StatusCode.INTERNAL, "the server failed on this request (RuntimeError: RuntimeError)"),
])
def test_status_for_error(error: Exception, code: grpc.StatusCode, details: str):
    assert status_for_error(error) == (code, details)


@pytest.mark.parametrize(("error", "trailers"), [
    (CapacityError("full", retry_after_s=1.2), (("grpc-retry-pushback-ms", "1200"),)),
    (CapacityError("full", retry_after_s=0.0004), (("grpc-retry-pushback-ms", "1"),)),  # whole ms, rounded up
    (CapacityError("full"), ()),
    (ServingError("died"), ()),
])
def test_trailers_for_error(error: Exception, trailers: tuple[tuple[str, str], ...]):
    assert trailers_for_error(error) == trailers


@pytest.mark.parametrize(("trailing_metadata", "seconds"), [
    ((("x-other", "5"), ("grpc-retry-pushback-ms", "1200")), 1.2),
    ((("grpc-retry-pushback-ms", "0"),), 0.0),
    ((("grpc-retry-pushback-ms", "-1"),), None),  # gRFC A6: negative means do not retry
    ((("grpc-retry-pushback-ms", "soon"),), None),
    ((("x-other", "5"),), None),
    (None, None),
])
def test_pushback_s(trailing_metadata: tuple[tuple[str, str], ...] | None, seconds: float | None):
    assert pushback_s(trailing_metadata) == seconds


# ------------------------------------------------------------------- a served engine


class Served:
    def __init__(self, loop: LoopThread, server: GrpcServer, frontend: EngineFrontend, port: int):
        self.loop, self.server, self.frontend, self.engine = loop, server, frontend, frontend.engine
        self.address = f"127.0.0.1:{port}"
        self.client = GenerationClient(self.address)


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def served(loaded: LoadedModel, loop_thread: LoopThread) -> Iterator[Served]:
    # A small cache (about 1.4k tokens) is plenty here and spares the shared machine's memory.
    frontend = EngineFrontend(LLMEngine(EngineConfig(kv_cache_bytes=64 << 20), loaded=loaded))
    server = GrpcServer(frontend, health_poll_s=0.05)

    async def start() -> tuple[int, asyncio.Task[None]]:
        return await server.start("127.0.0.1", 0), asyncio.create_task(frontend.run())

    port, step_loop = loop_thread.run(start())
    served = Served(loop_thread, server, frontend, port)
    yield served
    served.client.close()
    loop_thread.run(server.stop(0))
    loop_thread.loop.call_soon_threadsafe(step_loop.cancel)


def collect(responses: Iterator[pb.GenerateResponse]) -> tuple[list[int], str, pb.GenerateResponse]:
    """(token ids, text, last message) of a whole stream."""
    token_ids, text, last = [], "", None
    for response in responses:
        token_ids += response.token_ids
        text += response.text
        last = response
    assert last is not None and last.finished, "the stream ended without a finished message"
    return token_ids, text, last


def greedy(prompt: str | None = None, **fields: Any) -> pb.GenerateRequest:
    return make_request(prompt, max_tokens=MAX_TOKENS, temperature=0.0, **fields)


def assert_engine_idle(engine: LLMEngine, timeout_s: float = 30.0) -> None:
    """No request left and every KV block back in the pool (aborts land between steps)."""
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_unfinished_requests()
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_greedy_stream_equals_the_offline_llm(served: Served, llm, prompt: str):
    expected = llm.generate(prompt, GREEDY)[0]
    for request in (greedy(prompt), greedy(prompt_token_ids=llm.tokenizer.encode(prompt))):
        token_ids, text, last = collect(served.client.generate(request))
        assert (token_ids, text) == (expected.token_ids, expected.text)
        assert last.finish_reason == str(expected.finish_reason)
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(expected.prompt_token_ids),
                                                                             len(expected.token_ids))
    assert_engine_idle(served.engine)


def test_concurrent_streams_are_batched_and_each_equals_its_offline_output(served: Served, llm):
    prompts = PROMPTS[3:6]
    expected = [(o.token_ids, o.text) for o in llm.generate(prompts, GREEDY)]
    results: dict[int, tuple[list[int], str]] = {}

    def stream(index: int) -> None:
        token_ids, text, _ = collect(served.client.generate(greedy(prompts[index], request_id=f"concurrent-{index}")))
        results[index] = (token_ids, text)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [results.get(i) for i in range(len(prompts))] == expected


def test_chat_messages_get_the_models_template_on_the_server(served: Served, llm):
    messages = [{"role": "user", "content": "Name one primary color."}]
    prompt_ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    expected = llm.generate(prompt_ids, GREEDY)[0]
    token_ids, text, last = collect(served.client.generate(greedy(messages=messages, model=MODEL_NAME)))
    assert (token_ids, text, last.usage.prompt_tokens) == (expected.token_ids, expected.text, len(prompt_ids))


def test_request_id_is_echoed(served: Served):
    responses = list(served.client.generate(greedy("Hello", request_id="my-id-7")))
    assert {r.request_id for r in responses} == {"my-id-7"}


BAD_REQUESTS: list[tuple[str, Callable[[LLMEngine], pb.GenerateRequest], str]] = [
    ("empty prompt", lambda e: greedy(""), "prompt must not be empty"),
    ("too long", lambda e: greedy(prompt_token_ids=[42] * e.max_model_len), "max_model_len is"),
    ("token outside vocab", lambda e: greedy(prompt_token_ids=[10**9]), "outside the vocabulary"),
    ("temperature < 0", lambda e: make_request("Hi", temperature=-1.0), "temperature must be >= 0"),
    ("top_p 0", lambda e: make_request("Hi", top_p=0.0), "top_p must be in (0, 1]"),
    ("no input", lambda e: make_request(max_tokens=2), "exactly one of prompt, prompt_token_ids and messages"),
    ("two inputs", lambda e: greedy("Hi", messages=[{"role": "user", "content": "Hi"}]), "got prompt and messages"),
    ("unknown model", lambda e: greedy("Hi", model="gpt-9"), "'gpt-9' is not served here"),
    ("bad slo", lambda e: greedy("Hi", ttft_ms=-1), "slo.ttft_ms must be positive"),
]


@pytest.mark.parametrize(("make", "fragment"), [(m, f) for _, m, f in BAD_REQUESTS],
                         ids=[name for name, _, _ in BAD_REQUESTS])
def test_bad_requests_are_invalid_argument(served: Served, make, fragment: str):
    with pytest.raises(grpc.RpcError) as info:
        list(served.client.generate(make(served.engine)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()


def test_the_server_keeps_serving_after_bad_requests(served: Served, llm):
    for _, make, _ in BAD_REQUESTS:
        with pytest.raises(grpc.RpcError):
            list(served.client.generate(make(served.engine)))
    token_ids, _, _ = collect(served.client.generate(greedy(PROMPTS[0])))
    assert token_ids == llm.generate(PROMPTS[0], GREEDY)[0].token_ids
    assert_engine_idle(served.engine)


@pytest.mark.parametrize(("error", "code", "pushback"), [
    (CapacityError("no decode worker has 40 free blocks"), grpc.StatusCode.RESOURCE_EXHAUSTED, None),
    (CapacityError("no decode worker has 40 free blocks", retry_after_s=1.2), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "1200"),
    (ServingError("prefill-0 died"), grpc.StatusCode.UNAVAILABLE, None),
    (ZeroDivisionError("a bug"), grpc.StatusCode.INTERNAL, None),
])
def test_frontend_errors_map_to_statuses(served: Served, error: Exception, code: grpc.StatusCode,
                                         pushback: str | None, caplog):
    served.frontend.fail_with = error
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(served.client.generate(greedy("Hi", request_id="failing")))
    finally:
        served.frontend.fail_with = None
    assert info.value.code() == code
    assert str(error) in info.value.details()
    assert dict(info.value.trailing_metadata()).get("grpc-retry-pushback-ms") == pushback
    logged = [r for r in caplog.records if r.name == "splitserve.router.grpc_server" and r.exc_info]
    assert len(logged) == (code == grpc.StatusCode.INTERNAL)  # only bugs leave a trace in the log


def test_cancelling_the_stream_closes_the_frontend_iterator_and_aborts_the_request(served: Served):
    closed_before = served.frontend.num_closed_early
    responses = served.client.generate(make_request(PROMPTS[1], max_tokens=400, temperature=0.0, ignore_eos=True))
    first = next(responses)
    assert not first.finished
    assert served.engine.has_unfinished_requests()
    responses.close()  # cancels the call
    assert_engine_idle(served.engine)
    assert served.frontend.num_closed_early == closed_before + 1


def test_health_follows_is_ready(served: Served):
    channel = grpc.insecure_channel(served.address)
    health = health_pb2_grpc.HealthStub(channel)

    def check(service: str) -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status

    watch = health.Watch(health_pb2.HealthCheckRequest(service=GENERATION_SERVICE), timeout=60)
    assert next(watch).status == SERVING
    assert check("") == check(GENERATION_SERVICE) == SERVING
    served.frontend.ready = False
    try:
        assert check("") == check(GENERATION_SERVICE) == NOT_SERVING
        assert next(watch).status == NOT_SERVING  # within a poll interval
    finally:
        served.frontend.ready = True
    assert next(watch).status == SERVING
    watch.cancel()
    with pytest.raises(grpc.RpcError) as info:
        check("splitserve.v1.NoSuchService")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    channel.close()


def test_wait_ready(served: Served):
    served.client.wait_ready(30)
    served.frontend.ready = False
    try:
        with pytest.raises(TimeoutError, match="NOT_SERVING"):
            served.client.wait_ready(2)
    finally:
        served.frontend.ready = True
    with GenerationClient("127.0.0.1:1") as nowhere, pytest.raises(TimeoutError, match="not ready"):
        nowhere.wait_ready(2)


def test_reflection_lists_the_services(served: Served):
    with grpc.insecure_channel(served.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {GENERATION_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        assert database.FindFileContainingSymbol(GENERATION_SERVICE).name == "splitserve/v1/serving.proto"


def test_cli_client_prints_the_same_text(served: Served, llm, capsys):
    expected = llm.generate(PROMPTS[0], GREEDY)[0]
    argv = ["client", PROMPTS[0], "--address", served.address, "--max-tokens", str(MAX_TOKENS), "--wait-ready", "5"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out == expected.text + "\n"
    assert f"[{MAX_TOKENS} tokens, {len(expected.prompt_token_ids)} prompt tokens, finish_reason=length]" in err


def test_cli_client_chat(served: Served, llm, capsys):
    expected = llm.chat([{"role": "user", "content": "Hi!"}], GREEDY)[0]
    assert cli.main(["client", "Hi!", "--chat", "--address", served.address, "--max-tokens", str(MAX_TOKENS)]) == 0
    assert capsys.readouterr().out == expected.text + "\n"


def test_cli_client_reports_the_status_and_exits_2(served: Served, capsys):
    assert cli.main(["client", "Hi", "--address", served.address, "--top-p", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "splitserve: error: INVALID_ARGUMENT: top_p must be in (0, 1], got 0.0\n"


# -------------------------------------------------- scripted frontends: streams and stop


class ScriptedFrontend:
    """Yields one delta, then raises ``error``, or (flood) yields forever without awaiting, so a
    cancel lands in the server's write, or else waits forever; ``closed`` is set once its
    iterator has been closed."""

    model_name = MODEL_NAME

    def __init__(self, error: Exception | None = None, flood: bool = False) -> None:
        self.error, self.flood = error, flood
        self.closed = threading.Event()

    def is_ready(self) -> bool:
        return True

    async def generate(self, request: GenerateInput) -> AsyncIterator[GenerateDelta]:
        try:
            yield GenerateDelta("scripted", [1], "a")
            if self.error is not None:
                raise self.error
            while self.flood:
                yield GenerateDelta("scripted", [1], "a")
            await asyncio.Event().wait()
        finally:
            self.closed.set()


def start_scripted(loop_thread: LoopThread, frontend: ScriptedFrontend) -> tuple[GrpcServer, str]:
    server = GrpcServer(frontend)
    return server, f"127.0.0.1:{loop_thread.run(server.start('127.0.0.1', 0))}"


def test_an_error_mid_stream_ends_it_with_its_status(loop_thread: LoopThread):
    server, address = start_scripted(loop_thread, ScriptedFrontend(error=ServingError("decode-3 died")))
    try:
        with GenerationClient(address) as client:
            responses = client.generate(make_request("Hi"))
            assert next(responses).text == "a"
            with pytest.raises(grpc.RpcError) as info:
                next(responses)
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAVAILABLE, "decode-3 died")
    finally:
        loop_thread.run(server.stop(0))


def test_a_cancel_during_a_write_closes_the_frontend_iterator(loop_thread: LoopThread):
    frontend = ScriptedFrontend(flood=True)
    server, address = start_scripted(loop_thread, frontend)
    try:
        with GenerationClient(address) as client:
            responses = client.generate(make_request("Hi"))
            next(responses)
            responses.close()
            assert frontend.closed.wait(30)
    finally:
        loop_thread.run(server.stop(0))


def test_wait_ready_sees_a_server_that_starts_late(loop_thread: LoopThread):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = GrpcServer(ScriptedFrontend())
    starter = threading.Timer(1.0, lambda: loop_thread.run(server.start("127.0.0.1", port)))
    try:
        with GenerationClient(f"127.0.0.1:{port}") as client:
            starter.start()
            client.wait_ready(10)  # connection refused at first
            assert client.health() == SERVING
    finally:
        starter.join()
        loop_thread.run(server.stop(0))


def test_stop_reports_not_serving_first_then_cancels_running_requests(loop_thread: LoopThread):
    frontend = ScriptedFrontend()
    server, address = start_scripted(loop_thread, frontend)
    with grpc.insecure_channel(address) as channel, GenerationClient(address) as client:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == SERVING
        running = client.generate(make_request("Hi"))
        assert next(running).text == "a"
        stopping = asyncio.run_coroutine_threadsafe(server.stop(grace_s=3), loop_thread.loop)
        assert next(watch).status == NOT_SERVING  # before the grace period ends
        assert frontend.closed.wait(30), "stop did not close the running request's iterator"
        stopping.result(30)
        with pytest.raises(grpc.RpcError) as info:
            next(running)
        assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(grpc.RpcError) as info:
            list(client.generate(make_request("Hi"), timeout_s=30))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_start_refuses_a_port_in_use(served: Served, loop_thread: LoopThread):
    port = int(served.address.rsplit(":", 1)[1])
    with pytest.raises(ValueError, match="cannot listen on"):
        loop_thread.run(GrpcServer(ScriptedFrontend()).start("127.0.0.1", port))
