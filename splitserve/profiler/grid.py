"""The designed grid of step shapes ``splitserve profile`` runs on a real engine.

Three families, each shape run ``repeats`` times, every timed step's ``StepStats`` handed to
``on_step`` (the profiler gives them to the workers' own ``StepModels``):

- prefill: one step of whole prompts, 1 or 4 of them, totalling 16 .. max_tokens tokens
  (doubling), within the engine's step budget;
- decode: B requests (1 .. max_batch, doubling) at a context of C tokens (16 .. max_tokens,
  quadrupling), B * C at most 4 * max_tokens (their prefill is the cost of a shape); with a
  speculative engine also at k = 1, 2, 4 drafts per request (up to its limit);
- mixed: B decoding requests (1, 4, 16, up to max_batch) while a prompt joins in chunks of n tokens (16 ..
  max_tokens / 4, quadrupling), two chunks each, so a chunk's start varies too.

Every prompt starts with a token no other prompt of the run starts with, so no prefix-cache hit
shrinks a measured prefill, and then repeats one sentence, which the n-gram proposer can copy.
The steps that only set a shape up (the decode batch's prefill, its first decode step, which is
the first of that batch size) run untimed, as does a short warm-up before the grid.

A shape's timed steps reach ``on_step`` once the shape is done, each at the median time of
its work class in that shape (``median_per_class``: steps alike in requests, new tokens,
prompt tokens and drafts), so a step that another process on the machine slowed does not pull
the fits: with ``repeats`` >= 3 a spike must hit most repeats of a class to count.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from splitserve.engine.engine import LLMEngine, StepStats
from splitserve.engine.sampling_params import SamplingParams

COPY_SENTENCE = "The quick brown fox jumps over the lazy dog, and the dog sleeps in the warm afternoon sun.\n"
MIN_TOKENS = 16  # the smallest prompt, context and chunk measured
MIXED_BATCHES = (1, 4, 16)
DRAFT_COUNTS = (1, 2, 4)


@dataclass(frozen=True)
class Grid:
    """The shapes of one profile (see the module docstring)."""

    prefill: tuple[tuple[int, int], ...]  # (prompts, tokens in all)
    decode: tuple[tuple[int, int, int], ...]  # (batch, context, drafts per request)
    mixed: tuple[tuple[int, int], ...]  # (decoding requests, chunk tokens)

    @property
    def num_shapes(self) -> int:
        return len(self.prefill) + len(self.decode) + len(self.mixed)


def doubling(low: int, high: int, factor: int = 2) -> list[int]:
    """low, low * factor, ... up to high, and high itself."""
    values = list(itertools.takewhile(lambda v: v <= high, (low * factor**i for i in itertools.count())))
    return values + [high] if values[-1] != high else values


def make_grid(max_tokens: int, max_batch: int, step_budget: int, max_seqs: int, max_drafts: int) -> Grid:
    """The grid for these limits; ``max_drafts`` 0 for an engine without speculation."""
    prefill_max = min(max_tokens, step_budget)
    prefill = tuple((n, t) for t in doubling(MIN_TOKENS, prefill_max) for n in (1, 4) if t // n >= MIN_TOKENS // 4)
    batches = doubling(1, min(max_batch, max_seqs))
    contexts = doubling(MIN_TOKENS, max_tokens, 4)
    ks = [0] + [k for k in DRAFT_COUNTS if k <= max_drafts]
    decode = tuple((b, c, k) for b in batches for c in contexts for k in ks if b * c <= 4 * max_tokens)
    chunk_max = max(MIN_TOKENS, min(max_tokens, step_budget) // 4)
    mixed = tuple((b, n) for b in MIXED_BATCHES if b <= min(max_batch, max_seqs)
                  for n in doubling(MIN_TOKENS, chunk_max, 4))
    return Grid(prefill, decode, mixed)


def work_class(stats: StepStats) -> tuple[int, int, int, int]:
    """What a step computed, but for its context (which grows by a token a step while a decode
    shape repeats): requests, new tokens, prompt tokens, drafts."""
    return stats.num_requests, stats.num_batched_tokens, stats.num_prefill_tokens, stats.num_draft_tokens


def median_per_class(steps: Sequence[StepStats]) -> list[StepStats]:
    """The steps of one shape, in order, each at the median ``step_time`` of its work class."""
    times: dict[tuple[int, int, int, int], list[float]] = {}
    for stats in steps:
        times.setdefault(work_class(stats), []).append(stats.step_time)
    medians = {key: statistics.median(values) for key, values in times.items()}
    return [dataclasses.replace(stats, step_time=medians[work_class(stats)]) for stats in steps]


class GridRunner:
    """Runs a grid's shapes on one engine, which must be idle; leaves it idle."""

    def __init__(self, engine: LLMEngine, on_step: Callable[[StepStats], None], repeats: int):
        self.engine = engine
        self.on_step = on_step
        self.repeats = repeats
        self._sentence = engine.tokenizer.encode(COPY_SENTENCE, add_special_tokens=False)
        self._first_tokens: Iterator[int] = itertools.cycle(range(engine.model_config.vocab_size))
        self._ids = itertools.count()
        self._timed: list[StepStats] = []  # the current shape's timed steps

    def run(self, grid: Grid, progress: Callable[[str], None] = lambda _: None) -> None:
        self.warm_up()
        for n, tokens in grid.prefill:
            progress(f"prefill {n} prompt(s), {tokens} tokens")
            self._shape(self.prefill, n, tokens)
        for batch, context, k in grid.decode:
            progress(f"decode batch {batch}, context {context}, {k} drafts")
            self._shape(self.decode, batch, context, k)
        for batch, chunk in grid.mixed:
            progress(f"mixed: batch {batch} + chunks of {chunk}")
            self._shape(self.mixed, batch, chunk)
        self.engine.block_pool.reset_prefix_cache()

    def _shape(self, run: Callable[..., None], *shape: int) -> None:
        """Run one shape; hand its timed steps on, each at its work class's median."""
        self._timed = []
        run(*shape)
        for stats in median_per_class(self._timed):
            self.on_step(stats)

    def warm_up(self) -> None:
        self._add(MIN_TOKENS, 4)
        self._drain(timed=False)

    def prefill(self, num_prompts: int, num_tokens: int) -> None:
        for _ in range(self.repeats):
            for i in range(num_prompts):  # the last prompt takes the remainder
                self._add(num_tokens // num_prompts + (num_tokens % num_prompts if i == num_prompts - 1 else 0), 1)
            self._drain(timed=True)

    def decode(self, batch: int, context: int, k: int) -> None:
        # The prefill is set-up, untimed; a batch's prompts can take several steps, while the
        # first ones already decode, so each asks for enough tokens to still run when all do.
        num_prefill_steps = -(-batch * context // self.engine.config.max_num_batched_tokens)
        ids = [self._add(context, self.repeats + 2 + num_prefill_steps, k if k else None) for _ in range(batch)]
        self._step_until(lambda: self._num_decoding(ids) == batch, timed=False)
        self._step(timed=False)  # the first step of this batch size
        self._drain(timed=True)

    def mixed(self, batch: int, chunk: int) -> None:
        """``batch`` requests decode while ``repeats`` prompts of two chunks join one after another."""
        steps_per_prompt = 3  # two chunk steps and a plain decode step between prompts
        ids = [self._add(MIN_TOKENS, self.repeats * steps_per_prompt + 3) for _ in range(batch)]
        self._step_until(lambda: self._num_decoding(ids) == batch, timed=False)
        for _ in range(self.repeats):
            self._add(2 * chunk, 1, max_chunk_tokens=chunk)
            for _ in range(steps_per_prompt):
                self._step(timed=True)
        self._drain(timed=True)

    # ------------------------------------------------------------------------- helpers

    def _add(self, num_tokens: int, max_tokens: int, k: int | None = None, max_chunk_tokens: int | None = None
             ) -> str:
        repeated = self._sentence * (num_tokens // len(self._sentence) + 1)
        prompt = [next(self._first_tokens)] + repeated[: num_tokens - 1]
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, num_speculative_tokens=k)
        return self.engine.add_request(prompt, params, request_id=f"profile-{next(self._ids)}",
                                       max_chunk_tokens=max_chunk_tokens)

    def _num_decoding(self, ids: list[str]) -> int:
        """How many of ``ids`` have their whole prompt computed."""
        running = {r.request_id: r for r in self.engine.scheduler.running}
        return sum(1 for i in ids if i in running and running[i].num_computed_tokens >= running[i].num_prompt_tokens)

    def _step(self, timed: bool) -> None:
        last = self.engine.step_stats[-1] if self.engine.step_stats else None
        self.engine.step()
        if timed and self.engine.step_stats and self.engine.step_stats[-1] is not last:
            self._timed.append(self.engine.step_stats[-1])

    def _step_until(self, done: Callable[[], bool], timed: bool) -> None:
        while not done():
            assert self.engine.has_unfinished_requests(), "the engine finished before the shape was set up"
            self._step(timed)

    def _drain(self, timed: bool) -> None:
        while self.engine.has_unfinished_requests():
            self._step(timed)
