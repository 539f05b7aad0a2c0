"""Sampling as pure functions over a batch of logits, one row per request.

Greedy rows take the argmax. Other rows are scaled by temperature, cut by top-k and top-p,
and sampled with the exponential-race trick (argmax of p / E, E ~ Exp(1)), which draws each
row's noise from that row's own generator when it has a seed: a seeded request samples the
same tokens whatever it is batched with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p set with -inf.

    top-p cuts the distribution left by top-k (as vLLM and HF do). top_k >= vocab and
    top_p == 1 disable their cut.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(-1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
    # Rounding lets the cumulative sum reach 1 before the tail: top_p == 1 must not cut there.
    remove = (mass_before >= top_p.unsqueeze(-1)) & (top_p < 1).unsqueeze(-1)
    remove[:, 0] = False  # the best token always survives
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def compute_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """The distribution each non-greedy row samples from (temperature must be > 0 there)."""
    scaled = logits / temperature.clamp(min=1e-6).unsqueeze(-1)
    needs_cut = bool((top_k < logits.shape[-1]).any() or (top_p < 1).any())
    if needs_cut:
        scaled = apply_top_k_top_p(scaled, top_k, top_p)
    return scaled.softmax(dim=-1)


def exponential_noise(shape: tuple[int, int], generators: Sequence[torch.Generator | None], device) -> torch.Tensor:
    """Exp(1) noise (-log U), each row drawn from its own generator when it has one.

    Uniform draws from the row's generator depend only on that generator's state, so a seeded
    row gets the same noise whatever else is in the batch.
    """
    uniform = torch.rand(shape, device=device)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform[row] = torch.rand(shape[1], generator=generator, device=generator.device).to(device)
    return -torch.log(uniform.clamp_(min=torch.finfo(uniform.dtype).tiny))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """One token id per row. temperature == 0 rows are greedy."""
    greedy = logits.argmax(dim=-1)
    is_random = temperature > 0
    if not bool(is_random.any()):
        return greedy
    probs = compute_probs(logits, temperature, top_k, top_p)
    noise = exponential_noise(tuple(probs.shape), generators, probs.device)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(is_random, sampled, greedy)
