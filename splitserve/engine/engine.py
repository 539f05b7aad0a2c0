"""LLMEngine: add_request / step / abort over one model, one KV cache and one scheduler.

It validates requests at the edge (a bad request raises ``ValueError`` before it touches any
state, so other requests are unaffected), runs one scheduled step at a time, samples, applies
stop conditions and detokenizes incrementally. Usable on its own, without Ray; the workers
wrap it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splitserve.config import EngineConfig
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.kv_cache import KVCacheManager
from splitserve.engine.loader import load_model
from splitserve.engine.model import Model
from splitserve.engine.request import FinishReason, Request
from splitserve.engine.runner import BatchItem, ModelRunner
from splitserve.engine.sampler import sample
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from splitserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """A request's state after a step: everything so far, plus what this step added."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None


@dataclass
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer
    text: str = ""
    num_emitted_tokens: int = 0
    num_emitted_chars: int = 0


@dataclass(frozen=True)
class LoadedModel:
    """A model and its tokenizer in memory; engines with different settings can share one."""

    model: Model
    tokenizer: Tokenizer

    @classmethod
    def load(cls, config: EngineConfig) -> LoadedModel:
        model_config, weights, tokenizer = load_model(config.model)
        return cls(Model(model_config, weights, config.torch_dtype, config.device), tokenizer)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None):
        self.config = config = config or EngineConfig()
        loaded = loaded or LoadedModel.load(config)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.model_config = model_config = loaded.model.config
        num_blocks = config.num_kv_blocks or max(
            config.kv_cache_bytes // (model_config.kv_bytes_per_token * config.block_size), 1
        )
        self.max_model_len = min(
            config.max_model_len or model_config.max_position_embeddings,
            model_config.max_position_embeddings,
            num_blocks * config.block_size,  # a request alone always fits: no deadlock
        )
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            logger.info("without chunked prefill, prompts are limited to max_num_batched_tokens")
            self.max_model_len = config.max_num_batched_tokens
        self.block_pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching)
        self.kv_cache = KVCacheManager(self.block_pool)
        self.scheduler = Scheduler(
            self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill
        )
        self.runner = ModelRunner(self.model, num_blocks, config.block_size)
        self._requests: dict[str, _Tracked] = {}
        self._ids = itertools.count()

    # -------------------------------------------------------------------------- requests

    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Validate and queue a request; return its id. Raises ValueError for bad input."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt_ids = self._prompt_token_ids(prompt)
        self._check_stop_token_ids(params)
        max_tokens = min(params.max_tokens, self.max_model_len - len(prompt_ids))
        request = Request(request_id, prompt_ids, params, max_tokens)
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        self._requests[request_id] = _Tracked(request, detokenizer)
        self.scheduler.add(request)
        return request_id

    def _prompt_token_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("prompt_token_ids must be integers")
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt_token_ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if not ids:
            raise ValueError("prompt must not be empty (it has no tokens)")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                "which must leave room for at least one generated token"
            )
        return ids

    def _check_stop_token_ids(self, params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab})")

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; unknown or finished ids are ignored."""
        tracked = self._requests.pop(request_id, None)
        if tracked is not None:
            tracked.request.finish_reason = FinishReason.ABORT
            self.scheduler.finish(tracked.request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ------------------------------------------------------------------------------ step

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that progressed."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        tokens = self._run(out)
        outputs = []
        for scheduled in out.scheduled:
            request = scheduled.request
            completes = scheduled.completes
            request.num_computed_tokens += scheduled.num_new_tokens
            self.kv_cache.cache_full_blocks(request.request_id, request.token_ids, request.num_computed_tokens)
            if completes:
                self._append_token(request, tokens.pop(0))
                outputs.append(self._output(self._requests[request.request_id]))
        return outputs

    def _run(self, out: SchedulerOutput) -> list[int]:
        items = [self._batch_item(s) for s in out.scheduled]
        logits = self.runner.execute(items)
        sampling = [s.request for s in out.scheduled if s.completes]
        if not sampling:
            return []
        params = [r.params for r in sampling]
        token_ids = sample(
            logits,
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            top_k=torch.tensor([p.top_k or logits.shape[-1] for p in params]),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            generators=[r.generator for r in sampling],
        )
        return token_ids.tolist()

    def _batch_item(self, scheduled: ScheduledRequest) -> BatchItem:
        request = scheduled.request
        start = request.num_computed_tokens
        return BatchItem(
            token_ids=request.token_ids[start : start + scheduled.num_new_tokens],
            start=start,
            block_table=self.kv_cache.block_table(request.request_id),
            num_logits=int(scheduled.completes),
        )

    def _append_token(self, request: Request, token_id: int) -> None:
        request.token_ids.append(token_id)
        params = request.params
        if (not params.ignore_eos and token_id == self.tokenizer.eos_token_id) or token_id in params.stop_token_ids:
            request.finish_reason = FinishReason.STOP
        elif request.num_output_tokens >= request.max_tokens:
            request.finish_reason = FinishReason.LENGTH

    def _output(self, tracked: _Tracked) -> RequestOutput:
        request = tracked.request
        new_ids = request.token_ids[request.num_prompt_tokens + tracked.num_emitted_tokens :]
        tracked.num_emitted_tokens += len(new_ids)
        tracked.text += tracked.detokenizer.add(new_ids)
        if request.finish_reason is not None:
            tracked.text += tracked.detokenizer.flush()  # a trailing partial character
        self._apply_stop_strings(tracked)
        if request.finish_reason is not None:
            self._finish(tracked)
        text = tracked.text
        if request.finish_reason is None and request.params.stop:
            # Hold back a tail that could still grow into a stop string.
            text = text[: max(len(text) - max(len(s) for s in request.params.stop) + 1, tracked.num_emitted_chars)]
        new_text = text[tracked.num_emitted_chars :]
        tracked.num_emitted_chars = len(text)
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=request.output_token_ids,
            text=text,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=request.is_finished,
            finish_reason=request.finish_reason,
        )

    def _apply_stop_strings(self, tracked: _Tracked) -> None:
        stops = tracked.request.params.stop
        if not stops:
            return
        # Only the tail can hold a new match: the previous text was already checked.
        window_start = max(tracked.num_emitted_chars - max(len(s) for s in stops), 0)
        hits = [i for s in stops if (i := tracked.text.find(s, window_start)) >= 0]
        if hits:
            tracked.text = tracked.text[: min(hits)]
            tracked.request.finish_reason = FinishReason.STOP

    def _finish(self, tracked: _Tracked) -> None:
        self.scheduler.finish(tracked.request)
        del self._requests[tracked.request.request_id]
