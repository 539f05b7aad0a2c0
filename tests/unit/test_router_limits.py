"""The Router's bounds that need no worker to check: a full wait queue refuses at once, with a
retry hint, and counts nothing in; bad limits are refused."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.cluster.embedded_store import MemoryStore
from splitserve.engine.model_files import default_model_path, load_tokenizer
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import CapacityError
from splitserve.router.api import GenerateInput
from splitserve.router.metrics import Metrics
from splitserve.router.router import Router


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def test_a_full_wait_queue_refuses_at_once_with_a_retry_hint(tokenizer):
    metrics = Metrics()
    router = Router(MemoryStore(), tokenizer, default_model_path(), mode="colocated", max_queued_requests=0,
                    metrics=metrics, get_actor=lambda name: None)

    async def ask() -> None:
        async for _ in router.generate(GenerateInput(SamplingParams(max_tokens=4), prompt="Hi")):
            pass

    with pytest.raises(CapacityError, match="0 requests are waiting for their first token") as error:
        asyncio.run(ask())
    assert error.value.retry_after_s == pytest.approx(1.0)  # no TTFT measured yet: the prior
    assert "splitserve_requests_waiting 0.0" in metrics.render().decode()
    with pytest.raises(ValueError, match="prompt must not be empty"):  # bad input is still told first
        asyncio.run(router.generate(GenerateInput(SamplingParams(), prompt="")).__anext__())


@pytest.mark.parametrize(("kwargs", "match"), [({"max_queued_requests": -1}, "max_queued_requests"),
                                               ({"migration_limit": -1}, "migration_limit")])
def test_bad_limits_are_refused(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Router(MemoryStore(), tokenizer, default_model_path(), get_actor=lambda name: None, **kwargs)
