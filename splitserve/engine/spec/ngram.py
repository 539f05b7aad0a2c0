"""Prompt-lookup (n-gram) proposer: copy what followed the last earlier occurrence of the
sequence's most recent n tokens. Free to run and strong on extractive text (summaries, code
edits, repeated passages); proposes nothing when the suffix has not been seen before."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from splitserve.engine.spec.proposer import DraftRequest


def propose_ngram(token_ids: Sequence[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``num_tokens`` drafts: the tokens after the most recent earlier match of the
    longest suffix of length n in [min_n, max_n]. No match -> []."""
    if num_tokens <= 0:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)
        matches = np.flatnonzero((windows == suffix).all(axis=1))
        if len(matches):
            start = int(matches[-1]) + n  # the most recent match predicts best
            return tokens[start : start + num_tokens].tolist()
    return []


class NgramProposer:
    """Stateless: proposes from each request's own tokens."""

    name = "ngram"
    is_deterministic = True

    def __init__(self, min_n: int = 2, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, batch: Sequence[DraftRequest]) -> list[list[int]]:
        return [propose_ngram(r.token_ids, r.num_draft_tokens, self.min_n, self.max_n) for r in batch]

    def on_verified(self, request_id: str, num_valid_tokens: int) -> None:
        pass

    def free(self, request_id: str) -> None:
        pass
