"""The startup profile: a few synthetic steps that seed a worker's latency models.

Before a worker serves, its engine runs requests chosen so that every feature of the models
moves: first prompts of several lengths prefilled and decoded together, then (with
speculation) one request at a time at each of a few k, on a repeated sentence the model copies,
so the proposer drafts and the cost of a draft at batch 1 is measured rather than left to the
prior. It runs on the engine thread and leaves nothing behind (prefix hashes are dropped).
"""

from __future__ import annotations

from splitserve.engine.engine import LLMEngine, StepStats
from splitserve.engine.sampling_params import SamplingParams

_COPY_SENTENCE = "The quick brown fox jumps over the lazy dog, and the dog sleeps in the warm afternoon sun.\n"
Plan = tuple[list[int], int, int | None]  # prompt token ids, output tokens, k


def run_profile(engine: LLMEngine, request_prefix: str) -> list[StepStats]:
    """Run the profile's phases one after another; the stats of every step that ran."""
    steps: list[StepStats] = []
    for phase, plans in enumerate(profile_phases(engine)):
        for i, (prompt, num_out, k) in enumerate(plans):
            params = SamplingParams(max_tokens=num_out, temperature=0, ignore_eos=True, num_speculative_tokens=k)
            engine.add_request(prompt, params, request_id=f"{request_prefix}-{phase}-{i}")
        while engine.has_unfinished_requests():
            last = engine.step_stats[-1] if engine.step_stats else None
            engine.step()
            if engine.step_stats and engine.step_stats[-1] is not last:  # a step that ran records stats
                steps.append(engine.step_stats[-1])
    engine.block_pool.reset_prefix_cache()
    return steps


def profile_phases(engine: LLMEngine) -> list[list[Plan]]:
    vocab = engine.model_config.vocab_size
    lengths = [(16, 4), (64, 4), (256, 4)] + [(8, 8)] * 4
    batch: list[Plan] = [([(7919 * (i * 1000 + j)) % vocab for j in range(n)], out, None)
                         for i, (n, out) in enumerate(lengths)]
    spec = engine.config.speculative
    if spec is None:
        return [batch]
    copy = engine.tokenizer.encode(_COPY_SENTENCE * 3)
    k_max = spec.max_speculative_tokens
    ks = sorted({0, 1, min(2, k_max), min(4, k_max), k_max})
    return [batch] + [[(copy, max(8, 3 * k), k)] for k in ks]
