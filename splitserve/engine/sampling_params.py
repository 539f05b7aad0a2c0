"""SamplingParams: how one request picks tokens and when it stops (validated at the API edge)."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 512
MAX_STOP_TOKEN_IDS = 1024


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings, as in vLLM.

    temperature 0 is greedy. top_k None keeps every token; top_p 1.0 keeps the whole mass.
    seed makes a sampled request reproducible, independent of what it is batched with.
    stop: strings that end the output (not included in it; at most MAX_STOP_STRINGS of at most
    MAX_STOP_CHARS characters); stop_token_ids: extra token ids that end it (included in
    token_ids; at most MAX_STOP_TOKEN_IDS). EOS ends it unless ignore_eos.
    num_speculative_tokens: drafts verified per step (0 disables speculation for this request);
    greedy output is identical either way, sampled output has the same distribution.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    num_speculative_tokens: int | None = None  # k drafts per step; None: the engine's default

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples.
        object.__setattr__(self, "stop", _as_tuple(self.stop, "stop", str))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids", int))
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        k = self.num_speculative_tokens
        if k is not None and (not _is_int(k) or k < 0):
            raise ValueError(f"num_speculative_tokens must be None or an integer >= 0, got {k!r}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        # Bounds against hostile requests: every step searches the tail of the text for each stop
        # string, and holds back as many characters as the longest is long.
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters "
                             f"each, got {len(self.stop)} of up to {max(map(len, self.stop))}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is not 1 token


def _as_tuple(value: object, name: str, kind: type) -> tuple:
    if isinstance(value, (str, bytes)) and kind is str:
        value = (value,)
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a list of {kind.__name__}, got {value!r}") from None
    if not all(isinstance(item, kind) and not isinstance(item, bool) for item in items):
        raise ValueError(f"{name} must be a list of {kind.__name__}, got {value!r}")
    return items
