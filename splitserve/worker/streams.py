"""A request's engine outputs as the GenerateDeltas a worker streams to its router.

``stream_deltas`` reads one request's stream from the EngineLoop and yields a delta per read:
outputs that queued up while the reader was busy go out merged as one (so a slow reader gets
fewer, larger messages rather than falling behind), and after the first delta it waits for at
least ``interval`` new tokens (or the end) before the next -- each message costs the worker
and its router CPU the engines could use. It owns nothing but the stream it reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from splitserve.engine.output import RequestOutput
from splitserve.errors import ServingError
from splitserve.protocol import GenerateDelta
from splitserve.worker.engine_loop import EngineLoop, StreamEnd


async def stream_deltas(
    loop: EngineLoop, request_id: str, stream: asyncio.Queue, abort: Callable[[str], Awaitable[None]],
    interval: int = 1,
) -> AsyncIterator[GenerateDelta]:
    """The request's outputs as deltas until it finishes, each after the first carrying at
    least ``interval`` tokens unless it is the last. Leaving early (the reader closed or was
    cancelled) calls ``abort(request_id)``; an engine failure raises its ServingError."""
    finished, is_first = False, True
    try:
        while not finished:
            items = [await stream.get()]
            _drain(stream, items)
            while not is_first and not _ends(items) and _num_tokens(items) < interval:
                items.append(await stream.get())
                _drain(stream, items)
            is_first = False
            outputs: list[RequestOutput | None] = []
            for item in items:
                if isinstance(item, StreamEnd):
                    if item.error is not None:
                        raise item.error
                    finished = True  # aborted
                    outputs.append(None)
                    break
                outputs.append(item)
                finished = item.finished
            yield merge_outputs(request_id, outputs)
    finally:
        loop.close_stream(request_id)
        if not finished:
            with contextlib.suppress(ServingError):  # the engine is gone already
                await asyncio.shield(abort(request_id))


def _drain(stream: asyncio.Queue, items: list) -> None:
    """Add what is queued already."""
    while not stream.empty():
        items.append(stream.get_nowait())


def _ends(items: list) -> bool:
    last = items[-1]
    return isinstance(last, StreamEnd) or last.finished


def _num_tokens(items: list) -> int:
    return sum(len(item.new_token_ids) for item in items)


def merge_outputs(request_id: str, outputs: list[RequestOutput | None]) -> GenerateDelta:
    """One delta for consecutive outputs of a request (None: it was aborted)."""
    last = next((o for o in reversed(outputs) if o is not None), None)
    real = [o for o in outputs if o is not None]
    aborted = outputs[-1] is None
    if last is None:
        return GenerateDelta(request_id, [], "", finished=True, finish_reason="abort")
    return GenerateDelta(
        request_id=request_id,
        token_ids=[t for o in real for t in o.new_token_ids],
        text="".join(o.new_text for o in real),
        finished=last.finished or aborted,
        finish_reason="abort" if aborted else (str(last.finish_reason) if last.finish_reason else None),
        num_prompt_tokens=len(last.prompt_token_ids),
        num_output_tokens=len(last.token_ids),
        num_draft_tokens=last.spec.num_draft_tokens,
        num_accepted_tokens=last.spec.num_accepted_tokens,
        generator_state=last.generator_state,
    )
