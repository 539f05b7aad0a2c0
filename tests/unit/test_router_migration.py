"""How the Router moves a request whose worker died, decided without workers: the streams of
the first and the continuing worker are stand-ins, the decision is the Router's own."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.cluster.embedded_store import MemoryStore
from splitserve.engine.model_files import default_model_path, load_tokenizer
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import ServingError, WorkerGone
from splitserve.protocol import GenerateDelta, RequestReport
from splitserve.router.api import GenerateInput
from splitserve.router.router import Router


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def _router(tokenizer, first, continued=None, migration_limit: int = 3) -> tuple[Router, list]:
    """A colocated Router whose first worker streams ``first`` and whose continuations stream
    ``continued`` (each a list of deltas, or a WorkerGone to raise there); the continuations asked."""
    router = Router(MemoryStore(), tokenizer, default_model_path(), mode="colocated", get_actor=lambda name: None,
                    migration_limit=migration_limit)
    asked = []

    async def stream(items):
        for item in items:
            if isinstance(item, Exception):
                raise item
            yield item

    async def continued_stream(req, sent):
        asked.append(sent.continuation())
        async for delta in stream(continued):
            yield delta

    router._colocated = lambda req: stream(first)
    router._continued = continued_stream
    return router, asked


def _run(router: Router) -> list[GenerateDelta]:
    async def ask() -> list[GenerateDelta]:
        request = GenerateInput(SamplingParams(max_tokens=3), prompt="Hi", request_id="r1")
        return [delta async for delta in router.generate(request)]

    return asyncio.run(ask())


def _gone() -> WorkerGone:
    return WorkerGone("worker-0", "worker worker-0 died or cannot be reached")


def test_a_worker_that_dies_after_the_last_delta_leaves_the_request_finished(tokenizer):
    done = GenerateDelta("r1", [5, 6, 7], "abc", finished=True, finish_reason="length", report=RequestReport())
    router, asked = _router(tokenizer, [done, _gone()])
    assert _run(router) == [done]
    assert asked == []  # nothing continued: a continuation of three tokens of three is bad input


def test_a_worker_that_dies_mid_stream_continues_elsewhere_from_what_the_client_got(tokenizer):
    rest = GenerateDelta("r1", [7], "c", finished=True, finish_reason="length", report=RequestReport())
    router, asked = _router(tokenizer, [GenerateDelta("r1", [5, 6], "ab"), _gone()], [rest])
    deltas = _run(router)
    assert [t for d in deltas for t in d.token_ids] == [5, 6, 7]
    assert [c.output_token_ids for c in asked] == [(5, 6)] and asked[0].num_emitted_chars == 2
    assert deltas[-1].report.migrations == 1


def test_a_request_moves_at_most_migration_limit_times(tokenizer):
    router, asked = _router(tokenizer, [GenerateDelta("r1", [5], "a"), _gone()], [_gone()], migration_limit=1)
    with pytest.raises(ServingError, match="moved 1 times already"):
        _run(router)
    assert len(asked) == 1
