"""LLMEngine: add_request / step / abort over one model, one KV cache and one scheduler.

It validates requests at the edge (a bad request raises ``ValueError`` before it touches any
state, so other requests are unaffected), runs one scheduled step at a time, drafts and
verifies speculative tokens, samples, applies stop conditions and streams text. Usable on its
own, without Ray; the workers wrap it. ``add_request(..., max_chunk_tokens=n)`` runs a prompt's
prefill in chunks of at most n tokens beside the running decodes, and each step's ``StepStats``
says how many prompt rows it carried, so the router can predict such mixed steps.
With ``EngineConfig(enforce_eager=False)`` the engine compiles its forward when it starts
(splitserve.engine.compiled; ``compile_time_s`` says what that cost, ``is_compiled`` whether
it worked).

Disaggregation needs two more paths, one per side of the KV handoff:

- prefill side: ``add_request(..., export_kv=True)`` runs the prompt only. Each step hands the
  engine's ``kv_exporter`` the token ranges of such requests, and the exporter gets a call as
  each layer's K/V land in the cache (so it can send them while later layers compute). After
  the first token the request leaves this engine (its blocks go back), unless that token
  already ended it; its output carries the sampler's RNG state for the decode side.
- decode side: ``reserve`` validates a request and holds blocks for its prompt without
  scheduling it, sharing the full blocks of a prefix this engine's prefix cache already holds
  (like a prefix hit: references taken, given back by ``abort``); the KV of the rest arrive
  into the other blocks from outside; ``start_reserved`` adds the request, prompt computed and
  first token given, to the running batch.

A request can also move here from a worker that died mid-stream: ``add_request(...,
continuation=Continuation(outputs, ...))`` recomputes its prompt and the tokens it produced
there, as after a preemption, and samples on, its RNG state restored for a seeded request (every
output of a seeded request carries that state, so whoever streams it can continue it).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from splitserve.config import EngineConfig
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.compiled import compile_runner, warm_up_token_counts
from splitserve.engine.continuation import Continuation
from splitserve.engine.kv_cache import KVCacheManager
from splitserve.engine.loader import load_model
from splitserve.engine.model import EAGER_STAGES, Model
from splitserve.engine.output import OutputState, RequestOutput
from splitserve.engine.request import FinishReason, Request
from splitserve.engine.runner import BatchItem, ModelRunner, limit_onednn_cache
from splitserve.engine.sampler import sample
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledRequest, Scheduler
from splitserve.engine.spec import DraftRequest, Proposer, make_proposer
from splitserve.engine.spec.verifier import VerifyItem, verify_batch
from splitserve.engine.tokenizer import Tokenizer
from splitserve.errors import CapacityError

__all__ = ["Continuation", "KVExporter", "KVSlice", "LLMEngine", "LoadedModel", "RequestOutput", "Reservation",
           "StepStats"]


@dataclass(frozen=True)
class LoadedModel:
    """A model and its tokenizer in memory; engines with different settings can share one."""

    model: Model
    tokenizer: Tokenizer

    @classmethod
    def load(cls, config: EngineConfig, model: str | None = None) -> LoadedModel:
        limit_onednn_cache()  # before anything runs oneDNN
        model_config, weights, tokenizer = load_model(model or config.model)
        return cls(Model(model_config, weights, config.torch_dtype, config.device, config.quantization), tokenizer)


@dataclass(frozen=True)
class StepStats:
    """What one step did and cost: the inputs of the router's step-time and acceptance models."""

    step_time: float  # seconds: scheduling, drafting, the forward, sampling, outputs
    draft_time: float  # seconds spent in the proposer
    num_requests: int
    num_batched_tokens: int
    num_context_tokens: int
    num_draft_tokens: int
    num_accepted_tokens: int
    num_prefill_tokens: int = 0  # rows computing prompt chunks (ScheduledRequest.is_prefill), not decodes or drafts
    prefill_attention: int = 0  # sum over those chunks of tokens * (start + tokens): the attention pairs


@dataclass(frozen=True)
class KVSlice:
    """Tokens [token_start, token_end) of an exporting request whose K/V are in the cache once a
    step's layer is done: the ones the step computes, and before them any that a prefix-cache
    hit supplied and were not exported yet. ``block_table`` maps the request's positions to
    blocks."""

    request_id: str
    token_start: int
    token_end: int
    block_table: tuple[int, ...]


@dataclass(frozen=True)
class Reservation:
    """Blocks a decode-side engine holds for a prompt whose K/V come from elsewhere.

    ``block_ids``: the request's block table (position p in slot ``block_ids[p // block_size] *
    block_size + p % block_size``). Its first ``num_cached_tokens`` positions (whole blocks,
    never the last prompt token) are already there, shared with this engine's prefix cache;
    only the K/V of positions from there on must arrive (and nothing may write the others).
    """

    block_ids: tuple[int, ...]
    num_cached_tokens: int


class KVExporter(Protocol):
    """Receives the K/V of ``export_kv`` requests as a step computes them (the prefill worker)."""

    def begin_step(self, slices: list[KVSlice]) -> Callable[[int], None]:
        """Called before a step's forward; returns the per-layer callback ``on_layer(i)``, which
        runs once layer i's K/V of every slice are in the cache (read them before returning,
        or copy them: later steps overwrite freed blocks)."""


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        loaded: LoadedModel | None = None,
        draft: LoadedModel | None = None,
        kv_exporter: KVExporter | None = None,
    ):
        self.config = config = config or EngineConfig()
        loaded = loaded or LoadedModel.load(config)
        _check_precision(loaded.model, config)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.model_config = model_config = loaded.model.config
        bytes_per_block = model_config.kv_bytes_per_token(config.torch_dtype.itemsize) * config.block_size
        num_blocks = config.num_kv_blocks or max(config.kv_cache_bytes // bytes_per_block, 1)
        self.max_model_len = min(
            config.max_model_len or model_config.max_position_embeddings,
            model_config.max_position_embeddings,
            num_blocks * config.block_size,  # a request alone always fits: no deadlock
        )
        if not config.enable_chunked_prefill:
            self.max_model_len = min(self.max_model_len, config.max_num_batched_tokens)
        self.block_pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching)
        self.kv_cache = KVCacheManager(self.block_pool)
        self.scheduler = Scheduler(
            self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill
        )
        self.runner = ModelRunner(self.model, num_blocks, config.block_size)
        # Seconds spent compiling the forward at start (0.0: eager), or lost if that failed.
        self.compile_time_s = 0.0
        if not config.enforce_eager:  # before any request holds blocks: the warm-up writes K/V
            counts = warm_up_token_counts(config.max_num_batched_tokens, self.max_model_len)
            self.compile_time_s = compile_runner(self.runner, counts)
        self.proposer: Proposer | None = None
        if config.speculative is not None:
            spec = config.speculative

            def draft_model() -> Model:
                if draft is not None:
                    return draft.model
                return loaded.model if spec.draft_model is None else LoadedModel.load(config, spec.draft_model).model

            self.proposer = make_proposer(spec, self.runner, num_blocks, config.block_size, draft_model)
        self.kv_exporter = kv_exporter
        self.step_stats: deque[StepStats] = deque(maxlen=4096)
        self._outputs: dict[str, OutputState] = {}
        self._reserved: dict[str, Request] = {}  # decode side: blocks held, KV still arriving
        self._ids = itertools.count()

    @property
    def is_compiled(self) -> bool:
        """Whether steps run the compiled forward (``enforce_eager=False`` and compiling worked)."""
        return self.runner.stages is not EAGER_STAGES

    # -------------------------------------------------------------------------- requests

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        export_kv: bool = False,
        max_chunk_tokens: int | None = None,
        continuation: Continuation | None = None,
    ) -> str:
        """Validate and queue a request; return its id. Raises ValueError for bad input.

        export_kv: prefill only; the request's K/V go to ``kv_exporter`` and it leaves after
        its first token (see the module docstring).
        max_chunk_tokens: the most prompt tokens of this request one step computes, so its
        prefill runs in chunks beside the decodes (None: only the step's token budget limits).
        continuation: what the request produced elsewhere; it goes on from there (its outputs
        stream only the tokens after those).
        """
        if export_kv and self.kv_exporter is None:
            raise ValueError("export_kv needs an engine with a kv_exporter")
        if export_kv and continuation is not None:
            raise ValueError("a continued request runs here to its end; it cannot export_kv")
        if max_chunk_tokens is not None and (
            not isinstance(max_chunk_tokens, int) or isinstance(max_chunk_tokens, bool) or max_chunk_tokens < 1
        ):
            raise ValueError(f"max_chunk_tokens must be an integer >= 1 or None, got {max_chunk_tokens!r}")
        request = self._new_request(prompt, params, request_id)
        request.export_kv = export_kv
        request.max_chunk_tokens = max_chunk_tokens
        num_emitted_chars = 0 if continuation is None else self._continue(request, continuation)
        self._outputs[request.request_id] = OutputState(request, self.tokenizer, num_emitted_chars)
        self.scheduler.add(request)
        return request.request_id

    def _continue(self, request: Request, continuation: Continuation) -> int:
        """Give a new request what it produced elsewhere; the characters its client got.
        ValueError (nothing changed that matters) for a continuation it cannot go on from."""
        if not isinstance(continuation, Continuation):
            raise ValueError(f"continuation must be a Continuation, got {type(continuation).__name__}")
        outputs = list(continuation.output_token_ids)
        vocab = self.model_config.vocab_size
        if not outputs or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in outputs):
            raise ValueError(f"a continuation's output_token_ids must be one or more token ids in [0, {vocab})")
        if len(outputs) >= request.max_tokens:
            raise ValueError(f"the request produced {len(outputs)} tokens already; it may produce "
                             f"{request.max_tokens} in all here, so nothing is left to continue")
        _restore_generator(request, continuation.generator_state, "a continuation's generator_state")
        request.token_ids.extend(outputs)
        return continuation.num_emitted_chars

    def reserve(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> Reservation:
        """Decode side: validate a request and hold KV blocks for its prompt (and first token),
        sharing the blocks of its longest prefix already in the prefix cache.

        Nothing runs until ``start_reserved``; ``abort`` gives the blocks back (the shared ones
        keep their other holders). Raises ValueError for bad input and CapacityError when the
        blocks or a sequence slot are not free now.
        """
        request = self._new_request(prompt, params, request_id)
        if len(self.scheduler.running) + len(self._reserved) >= self.config.max_num_seqs:
            raise CapacityError(f"all {self.config.max_num_seqs} sequence slots are taken")
        prefix = self.kv_cache.find_prefix(request.prompt_token_ids)  # never the last prompt token's block
        num_tokens = request.num_prompt_tokens + 1
        if not self.kv_cache.can_allocate(num_tokens, prefix):
            raise CapacityError(
                f"a {request.num_prompt_tokens}-token prompt needs {self.kv_cache.num_blocks_for(num_tokens)} "
                f"KV blocks ({len(prefix)} of them cached); {self.kv_cache.num_free_blocks} are free"
            )
        self.kv_cache.allocate(request.request_id, num_tokens, prefix)
        self._reserved[request.request_id] = request
        self._outputs[request.request_id] = OutputState(request, self.tokenizer)
        table = tuple(self.kv_cache.block_table(request.request_id))
        return Reservation(table, len(prefix) * self.config.block_size)

    def start_reserved(
        self, request_id: str, first_token_id: int, generator_state: bytes | None = None
    ) -> RequestOutput:
        """Decode side: the prompt's K/V are in the reserved blocks; run the request from its
        first token on. ``generator_state`` continues a seeded request's random stream where
        the prefill side left it. Returns the first token's output (finished if it ended the
        request, which frees the blocks)."""
        request = self._reserved.get(request_id)
        if request is None:
            raise ValueError(f"request_id {request_id!r} has no reservation")
        vocab = self.model_config.vocab_size
        if isinstance(first_token_id, bool) or not isinstance(first_token_id, int) or not 0 <= first_token_id < vocab:
            raise ValueError(f"first_token_id must be a token id in [0, {vocab}), got {first_token_id!r}")
        del self._reserved[request_id]
        _restore_generator(request, generator_state, "generator_state")
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv_cache.cache_full_blocks(request_id, request.token_ids, request.num_computed_tokens)
        self.scheduler.add_running(request)
        self._append_token(request, first_token_id)
        request.first_token_time = request.last_token_time = time.monotonic()
        return self._output(request)

    def is_running(self, request_id: str) -> bool:
        """True while the request is queued or running here (not reserved, not finished)."""
        return request_id in self._outputs and request_id not in self._reserved

    def has_request(self, request_id: str) -> bool:
        """True while the request is unfinished here: queued, running or reserved."""
        return request_id in self._outputs

    @property
    def num_reserved(self) -> int:
        return len(self._reserved)

    def _new_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None, request_id: str | None
    ) -> Request:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._outputs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt_ids = self._prompt_token_ids(prompt)
        self._check_stop_token_ids(params)
        default_k = self.config.speculative.num_speculative_tokens if self.config.speculative else 0
        k = default_k if params.num_speculative_tokens is None else params.num_speculative_tokens
        self._check_speculation(k)
        max_tokens = min(params.max_tokens, self.max_model_len - len(prompt_ids))
        return Request(request_id, prompt_ids, params, max_tokens, num_speculative_tokens=k)

    def set_speculation(self, request_id: str, num_speculative_tokens: int) -> None:
        """Change a running request's k (0 turns speculation off); applies from the next step."""
        state = self._outputs.get(request_id)
        if state is None:
            raise ValueError(f"request_id {request_id!r} is not running")
        self._check_speculation(num_speculative_tokens)
        state.request.num_speculative_tokens = num_speculative_tokens

    def _check_speculation(self, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"num_speculative_tokens must be an integer >= 0, got {k!r}")
        spec = self.config.speculative
        if k > 0 and spec is None:
            raise ValueError(f"num_speculative_tokens={k} needs an engine with a proposer (speculative config)")
        if spec is not None and k > spec.max_speculative_tokens:
            raise ValueError(f"num_speculative_tokens={k} exceeds max_speculative_tokens={spec.max_speculative_tokens}")

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

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; whether it was unfinished (unknown or finished
        ids are ignored)."""
        state = self._outputs.get(request_id)
        if state is None:
            return False
        state.request.finish_reason = FinishReason.ABORT
        self._finish(state.request)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ------------------------------------------------------------------------------ step

    def step(self) -> list[RequestOutput]:
        """Schedule, draft, run the model once, verify or sample, and report every request
        that gained tokens."""
        start = time.perf_counter()
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        num_context_tokens = sum(s.request.num_computed_tokens for s in out.scheduled)
        chunks = [(s.num_new_tokens - s.num_spec_tokens, s.request.num_computed_tokens) for s in out.scheduled
                  if s.is_prefill]  # (tokens, start) of each prompt chunk
        draft_start = time.perf_counter()
        self._propose(out.scheduled)
        draft_time = time.perf_counter() - draft_start
        kept = self._run(out.scheduled)
        now = time.monotonic()
        outputs, num_accepted = [], 0
        for scheduled in out.scheduled:
            request = scheduled.request
            if not scheduled.completes:  # a prefill chunk that does not reach the prompt's end
                request.num_computed_tokens += scheduled.num_new_tokens
                self.kv_cache.cache_full_blocks(request.request_id, request.token_ids, request.num_computed_tokens)
                continue
            tokens = kept.pop(0)
            num_accepted += len(tokens) - 1
            self._accept(scheduled, tokens, now)
            outputs.append(self._output(request))
        self.step_stats.append(
            StepStats(
                step_time=time.perf_counter() - start,
                draft_time=draft_time,
                num_requests=len(out.scheduled),
                num_batched_tokens=out.num_batched_tokens,
                num_context_tokens=num_context_tokens,
                num_draft_tokens=sum(s.num_spec_tokens for s in out.scheduled),
                num_accepted_tokens=num_accepted,
                num_prefill_tokens=sum(n for n, _ in chunks),
                prefill_attention=sum(n * (first + n) for n, first in chunks),
            )
        )
        return outputs

    def _propose(self, scheduled: list[ScheduledRequest]) -> None:
        speculating = [s for s in scheduled if s.num_spec_tokens > 0]
        if not speculating:
            return
        assert self.proposer is not None, "draft slots were reserved without a proposer"
        batch = [
            DraftRequest(
                request_id=s.request.request_id,
                token_ids=s.request.token_ids,
                num_computed_tokens=s.request.num_computed_tokens,
                num_draft_tokens=s.num_spec_tokens,
                block_table=self.kv_cache.block_table(s.request.request_id),
            )
            for s in speculating
        ]
        for s, drafts in zip(speculating, self.proposer.propose(batch)):
            s.set_drafts(drafts[: s.num_spec_tokens])

    def _run(self, scheduled: list[ScheduledRequest]) -> list[list[int]]:
        """One target forward; the tokens each completing request keeps, in order."""
        items = [self._batch_item(s) for s in scheduled]
        logits = self.runner.execute(items, on_layer=self._begin_export(scheduled))
        completing = [s for s in scheduled if s.completes]
        if not completing:
            return []
        if all(s.num_spec_tokens == 0 for s in completing):
            requests = [s.request for s in completing]
            params = [r.params for r in requests]
            token_ids = sample(
                logits,
                temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
                top_k=torch.tensor([p.top_k or logits.shape[-1] for p in params]),
                top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
                generators=[r.generator for r in requests],
            )
            return [[t] for t in token_ids.tolist()]
        verify = [VerifyItem(s.spec_token_ids, s.request.params, s.request.generator) for s in completing]
        return verify_batch(logits, verify)

    def _begin_export(self, scheduled: list[ScheduledRequest]) -> Callable[[int], None] | None:
        """The exporter's per-layer callback for this step's exporting requests, if any."""
        slices = []
        for s in scheduled:
            request = s.request
            end = request.num_computed_tokens + s.num_new_tokens - s.num_spec_tokens
            # After a preemption the request recomputes tokens it already exported: skip them.
            if request.export_kv and end > request.num_exported_tokens:
                table = tuple(self.kv_cache.block_table(request.request_id))
                slices.append(KVSlice(request.request_id, request.num_exported_tokens, end, table))
                request.num_exported_tokens = end
        if not slices:
            return None
        assert self.kv_exporter is not None, "export_kv requests need a kv_exporter"
        return self.kv_exporter.begin_step(slices)

    def _batch_item(self, scheduled: ScheduledRequest) -> BatchItem:
        request = scheduled.request
        start = request.num_computed_tokens
        num_real = scheduled.num_new_tokens - scheduled.num_spec_tokens
        return BatchItem(
            token_ids=request.token_ids[start : start + num_real] + scheduled.spec_token_ids,
            start=start,
            block_table=self.kv_cache.block_table(request.request_id),
            num_logits=(1 + scheduled.num_spec_tokens) if scheduled.completes else 0,
        )

    def _accept(self, scheduled: ScheduledRequest, kept: list[int], now: float) -> None:
        """Advance a request by the tokens it keeps; roll back the K/V of rejected drafts."""
        request = scheduled.request
        num_accepted = len(kept) - 1
        request.num_computed_tokens += scheduled.num_new_tokens - scheduled.num_spec_tokens + num_accepted
        if scheduled.num_spec_tokens:
            self.kv_cache.truncate(request.request_id, request.num_computed_tokens)
            assert self.proposer is not None
            self.proposer.on_verified(request.request_id, request.num_computed_tokens)
        num_appended = 0
        for token_id in kept:
            self._append_token(request, token_id)
            num_appended += 1
            if request.finish_reason is not None:
                break
        request.num_draft_tokens += scheduled.num_spec_tokens
        request.num_spec_steps += scheduled.num_spec_tokens > 0
        request.num_accepted_tokens += min(num_accepted, num_appended)  # drafts past a stop are dropped
        request.first_token_time = request.first_token_time or now
        request.last_token_time = now
        self.kv_cache.cache_full_blocks(
            request.request_id, request.token_ids, min(request.num_computed_tokens, request.num_tokens - 1)
        )

    def _append_token(self, request: Request, token_id: int) -> None:
        request.token_ids.append(token_id)
        params = request.params
        if (not params.ignore_eos and token_id == self.tokenizer.eos_token_id) or token_id in params.stop_token_ids:
            request.finish_reason = FinishReason.STOP
        elif request.num_output_tokens >= request.max_tokens:
            request.finish_reason = FinishReason.LENGTH

    def _output(self, request: Request) -> RequestOutput:
        output = self._outputs[request.request_id].update()
        if request.generator is not None:  # where it goes on elsewhere, its random stream does too
            output.generator_state = request.generator.get_state().numpy().tobytes()
        if request.export_kv:  # prefill done: the request goes on (or ends) elsewhere
            self._finish(request)
        elif output.finished:
            self._finish(request)
        return output

    def _finish(self, request: Request) -> None:
        self._reserved.pop(request.request_id, None)
        self.scheduler.finish(request)
        if self.proposer is not None:
            self.proposer.free(request.request_id)
        del self._outputs[request.request_id]


def _check_precision(model: Model, config: EngineConfig) -> None:
    """ValueError unless a model loaded elsewhere has the precision ``config`` asks for."""
    held = (model.dtype, model.quantization)
    if held != (config.torch_dtype, config.quantization):
        raise ValueError(f"the loaded model holds {held[0]} weights with quantization {held[1]}; this engine's "
                         f"config asks for {config.dtype} with quantization {config.quantization}: load the "
                         "model with the same config (LoadedModel.load(config))")


def _restore_generator(request: Request, state: bytes | None, what: str) -> None:
    """Continue a seeded request's random stream from ``state`` (``RequestOutput.generator_state``
    of the engine it comes from); ValueError naming ``what`` for bytes that are no sampler state."""
    if request.generator is None or state is None:
        return
    try:
        request.generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    except RuntimeError as e:
        raise ValueError(f"{what} is not a sampler state: {e}") from None
