"""Request: one generation's tokens and progress counters.

Progress is two counters: ``num_computed_tokens`` (tokens whose K/V are in the cache) catches
up with ``num_tokens`` (prompt + output). Chunked prefill, prefix hits and preemption by
recomputation are all just moves of the first counter; no phase flags are needed.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from splitserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"

    def __str__(self) -> str:
        return self.value


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens capped by the context window
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)  # prompt followed by output
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = field(init=False, default=None)
    num_preemptions: int = 0
    num_speculative_tokens: int = 0  # k: drafts verified per step (changeable between steps)
    num_draft_tokens: int = 0  # drafts proposed so far
    num_spec_steps: int = 0  # steps that verified at least one draft
    num_accepted_tokens: int = 0  # drafts the target kept
    first_token_time: float | None = None
    last_token_time: float | None = None
    export_kv: bool = False  # prefill only: K/V go to the engine's exporter
    num_exported_tokens: int = 0  # prompt tokens whose K/V were handed to the exporter
    max_chunk_tokens: int | None = None  # most pending tokens one step computes (None: the step budget)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
