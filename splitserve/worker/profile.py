"""The startup profile: a few synthetic steps that seed a worker's latency models.

Before a worker serves, its engine runs requests chosen so that every feature of the models
moves: first prompts of several lengths prefilled and decoded together; then a few short
requests decoding while prompts of several lengths join them a few steps apart, the longest in
capped chunks over several steps, so steps with a prompt chunk inside a decode batch are
measured; then (with speculation) one request at a time at each of a few k, on a repeated
sentence the model copies, so the proposer drafts and the cost of a draft at batch 1 is
measured rather than left to the prior. It runs on the engine thread and leaves nothing behind
(prefix hashes are dropped).
"""

from __future__ import annotations

from typing import NamedTuple

from splitserve.engine.engine import LLMEngine, StepStats
from splitserve.engine.sampling_params import SamplingParams

_COPY_SENTENCE = "The quick brown fox jumps over the lazy dog, and the dog sleeps in the warm afternoon sun.\n"


class Plan(NamedTuple):
    """One request of a phase."""

    prompt: list[int]  # token ids
    num_output_tokens: int
    k: int | None = None  # drafts per step (None: the engine's default)
    start_step: int = 0  # steps of its phase that run before it is added
    max_chunk_tokens: int | None = None


def run_profile(engine: LLMEngine, request_prefix: str) -> list[StepStats]:
    """Run the profile's phases one after another; the stats of every step that ran."""
    steps: list[StepStats] = []
    for phase, plans in enumerate(profile_phases(engine)):
        queued = sorted(enumerate(plans), key=lambda item: item[1].start_step)
        num_steps = 0
        while queued or engine.has_unfinished_requests():
            while queued and queued[0][1].start_step <= num_steps:
                i, plan = queued.pop(0)
                params = SamplingParams(max_tokens=plan.num_output_tokens, temperature=0, ignore_eos=True,
                                        num_speculative_tokens=plan.k)
                engine.add_request(plan.prompt, params, request_id=f"{request_prefix}-{phase}-{i}",
                                   max_chunk_tokens=plan.max_chunk_tokens)
            last = engine.step_stats[-1] if engine.step_stats else None
            engine.step()
            num_steps += 1
            if engine.step_stats and engine.step_stats[-1] is not last:  # a step that ran records stats
                steps.append(engine.step_stats[-1])
    engine.block_pool.reset_prefix_cache()
    return steps


def profile_phases(engine: LLMEngine) -> list[list[Plan]]:
    vocab = engine.model_config.vocab_size
    lengths = [(16, 4), (64, 4), (256, 4)] + [(8, 8)] * 4
    batch = [Plan(_tokens(vocab, i, n), out) for i, (n, out) in enumerate(lengths)]
    phases = [batch, _mixed_phase(engine)]
    spec = engine.config.speculative
    if spec is None:
        return phases
    copy = engine.tokenizer.encode(_COPY_SENTENCE * 3)
    k_max = spec.max_speculative_tokens
    ks = sorted({0, 1, min(2, k_max), min(4, k_max), k_max})
    return phases + [[Plan(copy, max(8, 3 * k), k)] for k in ks]


def _mixed_phase(engine: LLMEngine) -> list[Plan]:
    """Four requests decode 12 tokens while a prompt joins every three steps; each prompt fits
    beside them in one step's budget, and the longest runs in three chunks."""
    vocab = engine.model_config.vocab_size
    decoding = [Plan(_tokens(vocab, 100 + i, 8), 12) for i in range(4)]
    longest = max(min(engine.config.max_num_batched_tokens - len(decoding), engine.max_model_len - 1), 1)
    joining = [Plan(_tokens(vocab, 110 + i, min(n, longest)), 1, start_step=1 + 3 * i)
               for i, n in enumerate((16, 48, 96))]
    last = joining[-1]
    joining[-1] = last._replace(max_chunk_tokens=max(len(last.prompt) // 3, 1))
    return decoding + joining


def _tokens(vocab: int, seed: int, n: int) -> list[int]:
    """n prompt token ids; different seeds give different prompts."""
    return [(7919 * (seed * 1000 + j)) % vocab for j in range(n)]
