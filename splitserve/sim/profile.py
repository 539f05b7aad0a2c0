"""Latency profiles: what one iteration of one serving instance costs, for the simulator.

A ``LatencyProfile`` describes one model on one kind of device, per tensor-parallel degree
(``InstanceProfile``): the time of a prefill batch, of a decode step and (optionally, from our
own fitted models) of a step that mixes prompt chunks into a decode batch, in milliseconds, and
how many tokens of KV cache one instance holds. The formulas are DistServe's
(/work/shared/data/distserve/README.md), with C_i = a request's prompt + decode steps done:

- prefill of whole prompts L_1..L_n: ``a + b * sum(L_i) + c * sum(L_i^2)``
- decode step of B requests: ``a + b * sum(C_i + 1) + c * B``, the small-batch triple below
  ``threshold`` requests, the large-batch one from it on.

Mixed steps (the colocated ``chunked`` scheduler) are documented in ``InstanceProfile.mixed_ms``.
This module knows nothing of files (profile_files.py reads them) or of the simulation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Triple:
    """Coefficients (a, b, c) of one formula; ``where`` names them in error messages."""

    a: float
    b: float
    c: float

    @classmethod
    def parse(cls, value: object, where: str) -> Triple:
        """A triple from a JSON list of three numbers; ValueError naming ``where`` otherwise."""
        if not (isinstance(value, list) and len(value) == 3):
            raise ValueError(f"{where}: expected a list of 3 numbers [a, b, c], got {value!r}")
        if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value):
            raise ValueError(f"{where}: expected 3 finite numbers [a, b, c], got {value!r}")
        return cls(*map(float, value))


@dataclass(frozen=True)
class DecodeCoefficients:
    """A decode step's time: ``a + b * sum(C_i + 1) + c * B`` ms, by ``small`` below ``threshold``
    requests in the batch and by ``large`` from it on."""

    small: Triple
    large: Triple
    threshold: int

    def step_ms(self, num_requests: int, context_plus_one: int) -> float:
        """One step of ``num_requests`` requests whose C_i + 1 add up to ``context_plus_one``."""
        t = self.small if num_requests < self.threshold else self.large
        return t.a + t.b * context_plus_one + t.c * num_requests


@dataclass(frozen=True)
class MixedCoefficients:
    """A fitted mixed step (splitserve.latency.MixedStepModel's features, in ms): ``const +
    requests * (B + chunks) + decode_tokens * B + prefill_tokens * sum(n) + prefill_attention *
    sum(n * (start + n)) + context_tokens * (sum(C_i) + sum(start))`` for B decodes and prompt
    chunks of n tokens from position start. No drafts: the simulator does not speculate."""

    const: float
    requests: float
    decode_tokens: float
    prefill_tokens: float
    prefill_attention: float
    context_tokens: float


@dataclass(frozen=True)
class InstanceProfile:
    """One instance of the model at one TP degree: its step costs and KV capacity."""

    tp: int
    prefill: Triple
    decode: DecodeCoefficients
    kv_capacity_tokens: int
    mixed: MixedCoefficients | None = None  # None: mixed steps derived from prefill and decode

    def __post_init__(self) -> None:
        where = f"TP {self.tp}"
        if self.tp < 1:
            raise ValueError(f"a TP degree must be >= 1, got {self.tp}")
        if self.kv_capacity_tokens < 1:
            raise ValueError(f"{where}: kv_capacity_tokens must be >= 1, got {self.kv_capacity_tokens}")
        if self.decode.threshold < 1:
            raise ValueError(f"{where}: the decode batch-size threshold must be >= 1, got {self.decode.threshold}")
        for name, t in (("prefill", self.prefill), ("decoding_smallbs", self.decode.small),
                        ("decoding_largebs", self.decode.large)):
            # b + c >= 0 for decode: sum(C_i + 1) >= B, so the step stays >= a; a c below 0
            # comes from re-expressing a fitted model (profile_files), never from DistServe's.
            if t.a < 0 or t.b < 0 or (t.c < 0 if name == "prefill" else t.b + t.c < 0):
                raise ValueError(f"{where}: {name} coefficients must not make a step cheaper than free, got {t}")

    def prefill_ms(self, prompt_lengths: Iterable[int]) -> float:
        """A prefill batch of whole prompts."""
        lengths = list(prompt_lengths)
        return self.prefill_batch_ms(sum(lengths), sum(n * n for n in lengths))

    def prefill_batch_ms(self, num_tokens: int, sum_squares: int) -> float:
        """A prefill batch given its tokens and the sum of its prompts' squared lengths (or, for
        chunks, of n * (start + n): the attention pairs they compute)."""
        return self.prefill.a + self.prefill.b * num_tokens + self.prefill.c * sum_squares

    def decode_ms(self, num_requests: int, context_plus_one: int) -> float:
        return self.decode.step_ms(num_requests, context_plus_one)

    def mixed_ms(self, num_decodes: int, context_plus_one: int, chunks: list[tuple[int, int]]) -> float:
        """One iteration running ``num_decodes`` decodes (their C_i + 1 summing to
        ``context_plus_one``) and prompt ``chunks`` of (tokens, start).

        With a fitted mixed model, that model. Otherwise: with no decodes, a prefill batch of
        the chunks (attention term n * (start + n), which is L^2 for a whole prompt); with no
        chunks, a decode step; with both, the decode step plus the chunks' marginal prefill cost
        (the prefill formula less its constant: one iteration pays one fixed overhead)."""
        tokens = sum(n for n, _ in chunks)
        pairs = sum(n * (start + n) for n, start in chunks)
        if self.mixed is not None:
            m = self.mixed
            context = context_plus_one - num_decodes + sum(start for _, start in chunks)
            return (m.const + m.requests * (num_decodes + len(chunks)) + m.decode_tokens * num_decodes
                    + m.prefill_tokens * tokens + m.prefill_attention * pairs + m.context_tokens * context)
        if num_decodes == 0:
            return self.prefill_batch_ms(tokens, pairs)
        extra = self.prefill.b * tokens + self.prefill.c * pairs if chunks else 0.0
        return self.decode_ms(num_decodes, context_plus_one) + extra


@dataclass(frozen=True)
class LatencyProfile:
    """One model on one kind of device: an ``InstanceProfile`` per TP degree, and what moving a
    prompt's KV between instances costs (``kv_bytes_per_token`` and ``kv_transfer_bytes_per_s``
    both set; else the transfer is free, DistServe's assumption)."""

    model: str
    device: str
    source: str  # the file it was read from, for messages and results
    instances: tuple[InstanceProfile, ...]
    kv_bytes_per_token: float | None = None
    kv_transfer_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        if not self.instances:
            raise ValueError(f"{self.source}: profile of {self.model!r} has no TP degrees")
        degrees = [i.tp for i in self.instances]
        if len(set(degrees)) != len(degrees):
            raise ValueError(f"{self.source}: profile of {self.model!r} lists a TP degree twice: {degrees}")
        for name in ("kv_bytes_per_token", "kv_transfer_bytes_per_s"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"{self.source}: {name} must be a number > 0, got {value!r}")

    @property
    def tp_degrees(self) -> list[int]:
        return sorted(i.tp for i in self.instances)

    def at_tp(self, tp: int) -> InstanceProfile:
        """The instance profile of TP degree ``tp``; ValueError naming the degrees there are."""
        for instance in self.instances:
            if instance.tp == tp:
                return instance
        raise ValueError(f"{self.source}: {self.model!r} has no profile for TP {tp} "
                         f"(it has TP {', '.join(map(str, self.tp_degrees))})")

    @property
    def has_transfer_cost(self) -> bool:
        return self.kv_bytes_per_token is not None and self.kv_transfer_bytes_per_s is not None

    def transfer_s(self, num_tokens: int) -> float:
        """Seconds to move ``num_tokens`` tokens of KV from a prefill to a decode instance."""
        if self.kv_bytes_per_token is None or self.kv_transfer_bytes_per_s is None:
            return 0.0
        return num_tokens * self.kv_bytes_per_token / self.kv_transfer_bytes_per_s
