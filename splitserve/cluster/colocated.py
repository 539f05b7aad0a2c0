"""ColocatedWorker: one engine doing prefill and decode for its requests (chunked prefill
mixes new prompts into the decode batches, Sarathi-style). The baseline every disaggregated
benchmark compares against, and the simplest deployment."""

from __future__ import annotations

from collections.abc import AsyncIterator

from splitserve.cluster.worker import Worker
from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.api import GenerateDelta


class ColocatedWorker(Worker):
    kind = "colocated"

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerateDelta]:
        """Run a request from its prompt; ValueError (before the first delta) for bad input."""
        stream = self.loop.open_stream(request_id)
        try:
            await self.loop.call(self.engine.add_request, prompt_token_ids, params, request_id)
        except BaseException:
            self.loop.close_stream(request_id)
            raise
        async for delta in self._stream(request_id, stream):
            yield delta
