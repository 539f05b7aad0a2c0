"""Lossless verification of draft tokens: the rejection sampler, as pure functions.

One target forward scores ``[last token, d_1 .. d_k]`` for a request, giving k + 1 rows of
logits. Row i is the target's distribution p_i for the token after d_i (row 0: after the last
token). Greedy requests keep drafts while they equal the target's argmax; sampled requests keep
d_i with probability min(1, p(d_i) / q(d_i)) and on the first rejection draw from
normalize(max(0, p - q)). Either way one more token comes from the target (the correction, or a
bonus after all drafts), so every step keeps between 1 and k + 1 tokens and the output has
exactly the distribution plain decoding would give. Deterministic proposers (n-gram, greedy
draft) have q = one-hot(d_i).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splitserve.engine.sampler import compute_probs, exponential_noise
from splitserve.engine.sampling_params import SamplingParams


def uniform(generator: torch.Generator | None, size: int, device: torch.device) -> torch.Tensor:
    """U(0, 1) draws from the request's own generator when it has one (seeded requests)."""
    if generator is None:
        return torch.rand(size, device=device)
    return torch.rand(size, generator=generator, device=generator.device).to(device)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from a probability vector, the same way the plain sampler draws."""
    noise = exponential_noise((1, probs.shape[-1]), [generator], probs.device)
    return int((probs / noise[0]).argmax())


def verify_greedy(target_argmax: torch.Tensor, draft_token_ids: list[int]) -> list[int]:
    """Tokens kept for a greedy request: the matching draft prefix plus the target's next token.

    target_argmax: [k + 1] argmax of each verified row.
    """
    best = target_argmax.tolist()
    kept = []
    for i, draft in enumerate(draft_token_ids):
        if draft != best[i]:
            break
        kept.append(draft)
    kept.append(best[len(kept)])
    return kept


def verify_sampled(
    target_probs: torch.Tensor,
    draft_token_ids: list[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> list[int]:
    """Tokens kept for a sampled request under the standard rejection rule.

    target_probs: [k + 1, V] target distributions (after temperature, top-k, top-p).
    draft_probs: [k, V] the proposer's distributions, or None for a deterministic proposer.
    """
    k = len(draft_token_ids)
    device = target_probs.device
    drafts = torch.tensor(draft_token_ids, dtype=torch.long, device=device)
    rows = torch.arange(k, device=device)
    p = target_probs[rows, drafts]
    q = torch.ones_like(p) if draft_probs is None else draft_probs[rows, drafts]
    accept = uniform(generator, k, device) < (p / q).clamp(max=1.0)
    num_accepted = k if bool(accept.all()) else int((~accept).nonzero()[0])
    kept = draft_token_ids[:num_accepted]
    if num_accepted == k:
        return kept + [sample_from(target_probs[k], generator)]
    residual = target_probs[num_accepted].clone()
    if draft_probs is None:
        residual[draft_token_ids[num_accepted]] = 0.0
    else:
        residual = (residual - draft_probs[num_accepted]).clamp_(min=0.0)
    total = residual.sum()
    # p == q on the support leaves nothing to correct with: then p itself is the right law.
    residual = residual / total if total > 0 else target_probs[num_accepted]
    return kept + [sample_from(residual, generator)]


@dataclass
class VerifyItem:
    """One request's rows in a verification batch: 1 + len(draft_token_ids) logits rows."""

    draft_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None


def verify_batch(logits: torch.Tensor, items: Sequence[VerifyItem]) -> list[list[int]]:
    """Tokens each request keeps, from logits [sum(1 + k_i), V] laid out request by request."""
    argmax = logits.argmax(dim=-1)
    vocab = logits.shape[-1]
    kept, row = [], 0
    for item in items:
        num_rows = len(item.draft_token_ids) + 1
        rows = slice(row, row + num_rows)
        row += num_rows
        if item.params.is_greedy:
            kept.append(verify_greedy(argmax[rows], item.draft_token_ids))
            continue
        p = item.params
        probs = compute_probs(
            logits[rows],
            temperature=torch.full((num_rows,), p.temperature, device=logits.device),
            top_k=torch.full((num_rows,), p.top_k or vocab, device=logits.device),
            top_p=torch.full((num_rows,), p.top_p, device=logits.device),
        )
        kept.append(verify_sampled(probs, item.draft_token_ids, None, item.generator))
    return kept
