"""Workloads for ``splitserve loadtest``: which prompts to send and how many tokens to ask for.

A workload is named on the command line (`parse_workload`) and turned into a seeded, repeatable
list of `RequestSpec` before the run (`generate`), so the clients only send. Kinds:

- ``chat`` and ``code``: prompt and output lengths shaped like the Azure LLM inference trace
  (Nov 2023; the table is in docs/loadtest.md and `AZURE_LENGTHS`), optionally scaled down for a
  CPU; chat prompts are English prose, code prompts Python source.
- ``fixed:IN/OUT``: every prompt IN tokens of prose, every output OUT tokens.
- ``prefix:SHARED/IN/OUT``: every prompt starts with the same SHARED-token text, then IN tokens of
  its own (SHARED+IN in all), for prefix caching.
- ``file:PATH``: JSONL lines ``{"prompt": str, "max_tokens": int}`` or
  ``{"prompt_tokens": int, "max_tokens": int}`` (prose of that many tokens is written); a line
  may also carry ``"arrival_s"``, its send time in seconds from the start (finite, >= 0, lines in
  arrival order), which ``--arrival trace`` replays (``resolve_trace``).

Prompt text is cut to an exact token count with the target's tokenizer (texts.py); a
`RequestSpec`'s ``prompt_tokens`` is what the server's own ``tokenizer.encode(prompt)`` gives.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, cast, get_args

import numpy as np

from splitserve.loadtest.arrivals import Arrival
from splitserve.loadtest.records import RequestSpec
from splitserve.loadtest.texts import PromptWriter, TextTokenizer, code_corpus, prose_corpus

if TYPE_CHECKING:
    from splitserve.engine.tokenizer import Tokenizer

WorkloadKind = Literal["chat", "code", "fixed", "prefix", "file"]
USAGE = "chat, code, fixed:IN/OUT, prefix:SHARED/IN/OUT or file:PATH"
Z90 = NormalDist().inv_cdf(0.9)  # 1.2816: the standard normal's 90th percentile
DEFAULT_MIN_PROMPT_TOKENS = 4
_LENGTH_STREAM, _TEXT_STREAM = 0, 1  # separate random streams: text changes never move the lengths
_COUNTS_OF = {"fixed": ("input_tokens", "output_tokens"), "prefix": ("shared_tokens", "input_tokens", "output_tokens")}


@dataclass(frozen=True)
class WorkloadSpec:
    """A parsed workload name; the token counts are those of fixed and prefix, the path that of file."""

    kind: WorkloadKind
    input_tokens: int | None = None    # fixed, prefix: a prompt's own tokens
    output_tokens: int | None = None   # fixed, prefix
    shared_tokens: int | None = None   # prefix: the text every prompt starts with
    path: Path | None = None           # file

    def __post_init__(self) -> None:
        if self.kind not in get_args(WorkloadKind):
            raise ValueError(f"unknown workload kind {self.kind!r}: expected {USAGE}")
        for name in _COUNTS_OF.get(self.kind, ()):
            value = getattr(self, name)
            if value is None or value < 1:
                raise ValueError(f"workload {self.kind}: token counts must be >= 1, got {name}={value}")
        if (self.kind == "file") != (self.path is not None):
            raise ValueError(f"workload {self.kind}: a path goes with file workloads, and only with them")

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.input_tokens}/{self.output_tokens}"
        if self.kind == "prefix":
            return f"prefix:{self.shared_tokens}/{self.input_tokens}/{self.output_tokens}"
        if self.kind == "file":
            return f"file:{self.path}"
        return self.kind


def parse_workload(text: str) -> WorkloadSpec:
    """A workload from its command-line name (see the module docstring); ValueError if malformed."""
    kind, has_args, args = text.strip().partition(":")
    if kind in ("chat", "code"):
        if has_args:
            raise ValueError(f"workload {text!r}: {kind} takes no arguments (use --scale to shrink it)")
        return WorkloadSpec(cast(WorkloadKind, kind))
    if kind == "fixed":
        num_in, num_out = _token_counts(text, args, ("IN", "OUT"))
        return WorkloadSpec("fixed", input_tokens=num_in, output_tokens=num_out)
    if kind == "prefix":
        shared, num_in, num_out = _token_counts(text, args, ("SHARED", "IN", "OUT"))
        return WorkloadSpec("prefix", input_tokens=num_in, output_tokens=num_out, shared_tokens=shared)
    if kind == "file":
        path = Path(args)
        if not args or not path.is_file():
            raise ValueError(f"workload {text!r}: {args!r} is not a file (file:PATH names a JSONL file)")
        return WorkloadSpec("file", path=path)
    raise ValueError(f"unknown workload {text!r}: expected {USAGE}")


def _token_counts(text: str, args: str, names: tuple[str, ...]) -> list[int]:
    usage = "/".join(names)
    parts = args.split("/")
    if len(parts) != len(names) or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"workload {text!r}: expected {usage} as {len(names)} whole numbers separated by '/'")
    return [int(part) for part in parts]


@dataclass(frozen=True)
class LengthQuantiles:
    """One token-length distribution of the Azure trace, sampled as a split lognormal.

    The brief's fit, one lognormal through p50 and p90 (sigma = ln(p90/p50)/1.2816), misses the
    table's p10 badly: it predicts p10 = p50^2/p90, i.e. 416 vs 147 (code input), 3 vs 7 (code
    output), 381 vs 207 (chat input), 39 vs 54 (chat output). So the lower half gets its own
    sigma from p10 (ln(p50/p10)/1.2816) and the upper half keeps that fit: the samples then hit
    p10, p50 and p90 exactly. The means, not fitted, land near the table: 2265 vs 2048, 26 vs 28,
    1304 vs 1155, 204 vs 211 (the lognormal's upper tail is a little heavier than the trace's).
    """

    p10: float
    p50: float
    p90: float
    mean: float  # the table's, for reference; not used by the fit

    @property
    def sigma_low(self) -> float:
        return float(np.log(self.p50 / self.p10) / Z90)

    @property
    def sigma_high(self) -> float:
        return float(np.log(self.p90 / self.p50) / Z90)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """size lengths (floats, before scaling and rounding)."""
        z = rng.standard_normal(size)
        return self.p50 * np.exp(z * np.where(z < 0, self.sigma_low, self.sigma_high))


# (prompt, output) lengths, Azure LLM inference trace Nov 2023 ("conversation" is chat here).
AZURE_LENGTHS = {
    "code": (LengthQuantiles(147, 1469, 5188, 2048), LengthQuantiles(7, 13, 55, 28)),
    "chat": (LengthQuantiles(207, 1020, 2734, 1155), LengthQuantiles(54, 129, 424, 211)),
}


@dataclass(frozen=True)
class LengthLimits:
    """Bounds on generated lengths. Sampled lengths (chat, code) are clamped into them; lengths a
    user asked for (fixed, prefix, file) must lie within the maxima, else ValueError: quietly
    changing them would mislabel the run. The minimum applies to sampled prompts only."""

    min_prompt_tokens: int = DEFAULT_MIN_PROMPT_TOKENS
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.min_prompt_tokens < 1:
            raise ValueError(f"min_prompt_tokens must be at least 1, got {self.min_prompt_tokens}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < self.min_prompt_tokens:
            raise ValueError(
                f"max_prompt_tokens ({self.max_prompt_tokens}) is below min_prompt_tokens ({self.min_prompt_tokens})"
            )
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens must be at least 1, got {self.max_output_tokens}")

    def clamp(self, prompt_tokens: int, output_tokens: int) -> tuple[int, int]:
        prompt = max(prompt_tokens, self.min_prompt_tokens)
        output = max(output_tokens, 1)
        if self.max_prompt_tokens is not None:
            prompt = min(prompt, self.max_prompt_tokens)
        if self.max_output_tokens is not None:
            output = min(output, self.max_output_tokens)
        return prompt, output

    def check(self, prompt_tokens: int, output_tokens: int, where: str) -> None:
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            raise ValueError(f"{where}: {prompt_tokens} prompt tokens exceed the cap of {self.max_prompt_tokens}")
        if self.max_output_tokens is not None and output_tokens > self.max_output_tokens:
            raise ValueError(f"{where}: {output_tokens} output tokens exceed the cap of {self.max_output_tokens}")


def sample_lengths(
    spec: WorkloadSpec, num_requests: int, *, seed: int = 0, scale: float = 1.0, limits: LengthLimits = LengthLimits()
) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) per request, without writing any text (fast).

    chat and code draw prompt and output lengths independently (the trace table gives no joint
    distribution), multiply both by `scale` and round: on a 2-core CPU a 1000-token prefill of a
    135M model takes seconds, so runs there use e.g. scale=0.125, which keeps the distributions'
    shape (every quantile scales by the same factor). fixed and prefix ignore `scale`.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if spec.kind in AZURE_LENGTHS:
        rng = np.random.default_rng([seed, _LENGTH_STREAM])
        prompt_dist, output_dist = AZURE_LENGTHS[spec.kind]
        prompts = np.rint(prompt_dist.sample(rng, num_requests) * scale).astype(int)
        outputs = np.rint(output_dist.sample(rng, num_requests) * scale).astype(int)
        return [limits.clamp(int(p), int(o)) for p, o in zip(prompts, outputs, strict=True)]
    if spec.kind in ("fixed", "prefix"):
        assert spec.input_tokens is not None and spec.output_tokens is not None, "parse_workload sets both"
        lengths = (spec.input_tokens + (spec.shared_tokens or 0), spec.output_tokens)
        limits.check(*lengths, where=f"workload {spec}")
        return [lengths] * num_requests
    raise ValueError(f"workload {spec} takes its lengths from its file, not from a sampler")


def generate(
    spec: WorkloadSpec,
    num_requests: int,
    tokenizer: TextTokenizer,
    *,
    seed: int = 0,
    scale: float = 1.0,
    min_prompt_tokens: int = DEFAULT_MIN_PROMPT_TOKENS,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
) -> list[RequestSpec]:
    """The requests of a run: same arguments (and Python version) -> same requests.

    Lengths come from `sample_lengths` (chat, code, fixed, prefix) or the file; bounds as in
    `LengthLimits`. Every prompt's `tokenizer.encode` length equals its `prompt_tokens` exactly.
    A file with fewer lines than num_requests is used again from its first line.
    """
    limits = LengthLimits(min_prompt_tokens, max_prompt_tokens, max_output_tokens)
    text_rng = np.random.default_rng([seed, _TEXT_STREAM])
    if spec.kind == "file":
        assert spec.path is not None, "parse_workload sets the path"
        return _file_requests(spec.path, num_requests, tokenizer, text_rng, limits)
    lengths = sample_lengths(spec, num_requests, seed=seed, scale=scale, limits=limits)
    writer = PromptWriter(tokenizer, code_corpus() if spec.kind == "code" else prose_corpus(), text_rng)
    prefix = writer.write(spec.shared_tokens) if spec.shared_tokens is not None else ""
    return [
        RequestSpec(index, writer.write(prompt_tokens, prefix), prompt_tokens, output_tokens, spec.kind)
        for index, (prompt_tokens, output_tokens) in enumerate(lengths)
    ]


def _file_requests(
    path: Path, num_requests: int, tokenizer: TextTokenizer, rng: np.random.Generator, limits: LengthLimits
) -> list[RequestSpec]:
    entries = read_workload_file(path)
    writer = PromptWriter(tokenizer, prose_corpus(), rng)
    requests = []
    for index in range(num_requests):
        entry = entries[index % len(entries)]
        prompt = entry.prompt if entry.prompt is not None else writer.write(entry.num_prompt_tokens())
        prompt_tokens = len(tokenizer.encode(prompt))
        limits.check(prompt_tokens, entry.max_tokens, where=entry.where)
        requests.append(RequestSpec(index, prompt, prompt_tokens, entry.max_tokens, "file"))
    return requests


@dataclass(frozen=True)
class FileEntry:
    """One line of a file:PATH workload: prompt text, or a token count to write prose for."""

    where: str  # "path:line", for error messages
    prompt: str | None
    prompt_tokens: int | None
    max_tokens: int
    arrival_s: float | None = None  # seconds from the start: a recorded trace's send time

    def num_prompt_tokens(self) -> int:
        assert self.prompt_tokens is not None, "an entry without text has a token count"
        return self.prompt_tokens


def read_workload_file(path: Path) -> list[FileEntry]:
    """The entries of a file:PATH workload; ValueError naming the line of the first bad one."""
    entries = []
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                entries.append(_file_entry(line, where=f"{path}:{number}"))
    if not entries:
        raise ValueError(f"workload file {path} has no requests")
    return entries


def _file_entry(line: str, where: str) -> FileEntry:
    try:
        data: Any = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    max_tokens = data.get("max_tokens")
    if not _is_count(max_tokens):
        raise ValueError(f"{where}: needs \"max_tokens\", a whole number >= 1")
    prompt, prompt_tokens = data.get("prompt"), data.get("prompt_tokens")
    if (prompt is None) == (prompt_tokens is None):
        raise ValueError(f"{where}: needs exactly one of \"prompt\" (text) and \"prompt_tokens\" (a count)")
    if prompt is not None and not (isinstance(prompt, str) and prompt):
        raise ValueError(f"{where}: \"prompt\" must be non-empty text")
    if prompt_tokens is not None and not _is_count(prompt_tokens):
        raise ValueError(f"{where}: \"prompt_tokens\" must be a whole number >= 1")
    arrival_s = data.get("arrival_s")
    if arrival_s is not None and not (isinstance(arrival_s, int | float) and not isinstance(arrival_s, bool)
                                      and 0 <= arrival_s < math.inf):
        raise ValueError(f"{where}: \"arrival_s\" must be a finite number of seconds >= 0, got {arrival_s!r}")
    return FileEntry(where, prompt, prompt_tokens, max_tokens, None if arrival_s is None else float(arrival_s))


def trace_offsets(entries: list[FileEntry]) -> list[float]:
    """The send times of a trace: every line's ``arrival_s``, in the file's order, which must be
    arrival order (ValueError naming the first line without one or out of order: sorting it
    quietly would change which request is which)."""
    offsets: list[float] = []
    for entry in entries:
        if entry.arrival_s is None:
            raise ValueError(f"{entry.where}: --arrival trace needs \"arrival_s\" (seconds from the start) on "
                             "every line")
        if offsets and entry.arrival_s < offsets[-1]:
            raise ValueError(f"{entry.where}: arrival_s {entry.arrival_s:g} is before the line above's "
                             f"{offsets[-1]:g}; a trace's lines must be in arrival order (sort it by arrival_s)")
        offsets.append(entry.arrival_s)
    return offsets


def resolve_trace(arrival: Arrival, spec: WorkloadSpec, num_requests: int) -> tuple[Arrival, int]:
    """For a trace arrival: the arrival with the workload file's offsets, and how many requests
    run (the file's first num_requests lines, all of them if it has fewer: a trace is replayed
    once, not cycled). Any other arrival comes back as it is, with num_requests."""
    if arrival.kind != "trace":
        return arrival, num_requests
    if spec.kind != "file" or spec.path is None:
        raise ValueError(f"--arrival trace replays the arrival_s of a file:PATH workload's lines; workload {spec} "
                         "has none")
    offsets = trace_offsets(read_workload_file(spec.path))
    return arrival.with_trace(offsets), min(num_requests, len(offsets))


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a GGUF file or Hugging Face folder; None: the default model's (SmolLM2)."""
    from splitserve.engine.model_files import load_tokenizer as load_model_tokenizer

    return load_model_tokenizer(path)
