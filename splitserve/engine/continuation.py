"""Continuation: what a request produced on another worker before it moved here.

A plain message (no torch), so the router that builds one and the actor shell that forwards it
stay light; the engine (``LLMEngine.add_request(..., continuation=...)``) applies it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Continuation:
    """What a request produced elsewhere before it moved here (its worker died): its output
    tokens, how many characters of their text its client already got (a tail held back for a
    stop string was not sent) and, for a seeded request, its sampler's RNG state after the
    last of them (``torch.Generator.get_state`` as bytes). The engine recomputes the prompt
    and those tokens like a preempted request and samples on from there."""

    output_token_ids: tuple[int, ...]
    num_emitted_chars: int = 0
    generator_state: bytes | None = None
