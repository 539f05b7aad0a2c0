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
    """Mask logits outside each row's top-k and top-p set with -inf. top_k >= vocab disables it."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    remove = ranks >= top_k.unsqueeze(-1)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
    remove |= mass_before >= top_p.unsqueeze(-1)
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
    """Exp(1) noise, each row from its own generator when it has one."""
    noise = torch.empty(shape, device=device).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    return noise


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
