"""The proposer interface: who drafts tokens for speculative decoding.

The engine calls ``propose`` once per step for the requests it will verify, after the
scheduler reserved KV space for ``1 + k`` tokens of each; ``on_verified`` after the target
kept some of the drafts (stateful proposers roll their own KV back); ``free`` when a request
ends. A proposer may return fewer drafts than asked (none at all is fine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass
class DraftRequest:
    """What a proposer sees of one request: its tokens and where its last token sits."""

    request_id: str
    token_ids: Sequence[int]  # prompt + output; the last one has no K/V in the target yet
    num_computed_tokens: int  # == len(token_ids) - 1
    num_draft_tokens: int  # k: how many drafts to propose at most
    block_table: Sequence[int]  # the target's blocks, with room for 1 + k more tokens


class Proposer(Protocol):
    name: str
    is_deterministic: bool  # True: q is one-hot on the proposed token (greedy drafting)

    def propose(self, batch: Sequence[DraftRequest]) -> list[list[int]]: ...

    def on_verified(self, request_id: str, num_valid_tokens: int) -> None:
        """The target now holds ``num_valid_tokens`` verified tokens of this request."""

    def free(self, request_id: str) -> None: ...
