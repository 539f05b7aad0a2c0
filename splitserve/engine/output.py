"""Request outputs: incremental detokenization, stop strings and streaming deltas.

The engine hands every request that gained tokens in a step to its ``OutputState``, which
turns the new token ids into text, ends the request on a stop string (cutting the text
before it) and holds back a tail that could still grow into one, so streamed deltas never
have to be taken back.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.request import FinishReason, Request
from splitserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class SpecStats:
    """Speculation counters of one request: acceptance = accepted / proposed; each verification
    step keeps its accepted drafts plus one token from the target."""

    num_draft_tokens: int
    num_accepted_tokens: int
    num_steps: int

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_kept_tokens(self) -> float:
        """Tokens kept per verification step (accepted + 1), 0 when nothing was verified."""
        return (self.num_accepted_tokens + self.num_steps) / self.num_steps if self.num_steps else 0.0


@dataclass
class RequestOutput:
    """A request's state after a step: everything so far, plus what this step added."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    arrival_time: float
    first_token_time: float | None
    last_token_time: float | None
    spec: SpecStats
    # A seeded request's sampler RNG state after this output's tokens (the decode side of a
    # handoff, or a worker it migrates to, continues from it).
    generator_state: bytes | None = None


class OutputState:
    """``num_emitted_chars``: of the text of the output tokens the request holds already (a
    continued request's), the characters its client got; ValueError when that text is shorter."""

    def __init__(self, request: Request, tokenizer: Tokenizer, num_emitted_chars: int = 0):
        self.request = request
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids, request.params.skip_special_tokens)
        self.num_emitted_tokens = request.num_output_tokens
        self.text = self.detokenizer.add(request.output_token_ids) if self.num_emitted_tokens else ""
        if not 0 <= num_emitted_chars <= len(self.text):
            raise ValueError(f"num_emitted_chars must be in [0, {len(self.text)}] (the text of the output tokens "
                             f"so far), got {num_emitted_chars}")
        self.num_emitted_chars = num_emitted_chars
        stops = request.params.stop
        self.max_stop_len = max((len(s) for s in stops), default=0)

    def update(self) -> RequestOutput:
        """Catch up with the request's tokens; may set its finish reason (stop string)."""
        request = self.request
        new_ids = request.output_token_ids[self.num_emitted_tokens :]
        self.num_emitted_tokens += len(new_ids)
        self.text += self.detokenizer.add(new_ids)
        if request.finish_reason is not None:
            self.text += self.detokenizer.flush()  # a trailing partial character
        self._apply_stop_strings()
        text = self.text
        if request.finish_reason is None and self.max_stop_len:
            # Hold back a tail that could still grow into a stop string.
            text = text[: max(len(text) - self.max_stop_len + 1, self.num_emitted_chars)]
        new_text = text[self.num_emitted_chars :]
        self.num_emitted_chars = len(text)
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=request.output_token_ids,
            text=text,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=request.finish_reason is not None,
            finish_reason=request.finish_reason,
            arrival_time=request.arrival_time,
            first_token_time=request.first_token_time,
            last_token_time=request.last_token_time,
            spec=SpecStats(request.num_draft_tokens, request.num_accepted_tokens, request.num_spec_steps),
        )

    def _apply_stop_strings(self) -> None:
        if not self.max_stop_len:
            return
        # Only the tail can hold a new match: earlier text was checked in earlier steps.
        window_start = max(self.num_emitted_chars - self.max_stop_len, 0)
        hits = [i for s in self.request.params.stop if (i := self.text.find(s, window_start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.request.finish_reason = FinishReason.STOP
