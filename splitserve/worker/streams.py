"""A request's engine outputs as the GenerateDeltas a worker streams to its router.

``stream_deltas`` reads one request's stream from the EngineLoop and yields a delta per read:
outputs that queued up while the reader was busy go out merged as one (so a slow reader gets
fewer, larger messages rather than falling behind). It owns nothing but the stream it reads.
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
) -> AsyncIterator[GenerateDelta]:
    """The request's outputs as deltas until it finishes. Leaving early (the reader closed or
    was cancelled) calls ``abort(request_id)``; an engine failure raises its ServingError."""
    finished = False
    try:
        while not finished:
            items = [await stream.get()]
            while not stream.empty():
                items.append(stream.get_nowait())
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
    )
