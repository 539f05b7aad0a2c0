"""Real text cut to an exact token count, for the prompts of a generated workload.

A load test needs prompts of given token lengths; padding with one repeated word would let the
tokenizer and the model see text unlike anything a user sends. So prompts are windows of real
text that ships with CPython, which works offline: English prose from the documentation topics
in `pydoc_data.topics` (the text of `help("if")` and friends) and Python source from a fixed
list of pure-Python standard-library modules. `PromptWriter` owns the cutting; the workload
generator (workloads.py) calls it once per request.

Token counts are what the server counts: `tokenizer.encode(text)` with its default special
tokens, because the server tokenizes the prompt text itself (SmolLM2 adds no BOS, so there the
count is the text's tokens alone; a tokenizer that adds BOS counts it too).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

import numpy as np
from pydoc_data.topics import topics

# Pure-Python stdlib modules whose source makes the code corpus (~560k characters on 3.11).
CODE_MODULES = (
    "argparse", "bisect", "calendar", "dataclasses", "difflib", "fractions", "functools", "heapq",
    "ipaddress", "json.decoder", "pprint", "shlex", "statistics", "string", "textwrap",
)
# Cuts tried on either side of the first guess before moving on to another window.
MAX_FIXUP_TOKENS = 8
MAX_WINDOWS = 50
REPLACEMENT_CHAR = "\ufffd"


class TextTokenizer(Protocol):
    """What prompt generation needs of a tokenizer (splitserve's `Tokenizer` has both)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class Corpus:
    """A body of text and the character offsets where a window may start (non-blank line starts)."""

    name: str
    text: str
    starts: tuple[int, ...]

    @classmethod
    def from_text(cls, name: str, text: str) -> Corpus:
        text = text.rstrip() + "\n\n"  # windows wrap around the end onto the start
        offsets = [0] + [i + 1 for i, char in enumerate(text) if char == "\n"]
        starts = tuple(o for o in offsets if o < len(text) and not text[o].isspace())
        return cls(name, text, starts)

    def window(self, start: int, num_chars: int) -> str:
        """num_chars characters from start, wrapping around the end as often as needed."""
        repeats = -(-num_chars // len(self.text))  # ceiling division
        return (self.text[start:] + self.text * repeats)[:num_chars]


@cache
def prose_corpus() -> Corpus:
    """CPython's documentation topics, in a fixed (sorted) order."""
    return Corpus.from_text("pydoc topics", "\n\n".join(topics[key] for key in sorted(topics)))


@cache
def code_corpus() -> Corpus:
    """The source of CODE_MODULES, read from their files (not imported)."""
    return Corpus.from_text("stdlib source", "\n\n".join(_module_source(name) for name in CODE_MODULES))


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, f"stdlib module {name} has no source file"
    return Path(spec.origin).read_text(encoding="utf-8")


class PromptWriter:
    """Writes prompts of an exact token count from one corpus, seeded by the caller's generator.

    Each prompt starts at a line start drawn without replacement (so prompts do not share a start,
    and thus a cacheable prefix, until the corpus's line starts run out), takes enough text, cuts it
    at the target token, decodes, re-encodes and moves the cut by a few tokens until the count is
    exact. Cutting decoded tokens rarely changes the count (a word cut in half may re-encode as more
    tokens); when no cut within MAX_FIXUP_TOKENS works, the next window is tried.
    """

    def __init__(self, tokenizer: TextTokenizer, corpus: Corpus, rng: np.random.Generator) -> None:
        self._tokenizer = tokenizer
        self._corpus = corpus
        self._starts = _shuffled_forever(corpus.starts, rng)
        sample = corpus.text[:20_000]
        self._chars_per_token = len(sample) / max(len(tokenizer.encode(sample)), 1)

    def write(self, num_tokens: int, prefix: str = "") -> str:
        """prefix followed by corpus text, num_tokens tokens in all; its ids begin with prefix's ids,
        so a server's prefix cache sees the shared prefix whole."""
        prefix_ids = self._tokenizer.encode(prefix)
        if num_tokens < len(prefix_ids):
            raise ValueError(f"cannot write {num_tokens} tokens after a prefix of {len(prefix_ids)} tokens")
        for _ in range(MAX_WINDOWS):
            body_ids = self._body_ids(next(self._starts), prefix, prefix_ids, num_tokens)
            text = None if body_ids is None else self._cut(prefix, prefix_ids, body_ids, num_tokens)
            if text is not None:
                return text
        raise ValueError(
            f"no text of exactly {num_tokens} tokens found in {MAX_WINDOWS} windows of the {self._corpus.name} "
            "corpus: this tokenizer does not reproduce the token count of text it decoded"
        )

    def _body_ids(self, start: int, prefix: str, prefix_ids: list[int], num_tokens: int) -> list[int] | None:
        """The ids after the prefix of prefix + a window long enough for the cut and its fix-ups;
        None if the window's first characters merge with the prefix's last token."""
        needed = num_tokens - len(prefix_ids) + MAX_FIXUP_TOKENS
        num_chars = int(needed * self._chars_per_token * 1.25) + 64
        if prefix:  # start at the line break before the line, so the text goes on on a new line
            start = (start - 1) % len(self._corpus.text)
        while True:
            ids = self._tokenizer.encode(prefix + self._corpus.window(start, num_chars))
            if ids[: len(prefix_ids)] != prefix_ids:
                return None
            if len(ids) - len(prefix_ids) >= needed:
                return ids[len(prefix_ids) :]
            num_chars *= 2

    def _cut(self, prefix: str, prefix_ids: list[int], body_ids: list[int], num_tokens: int) -> str | None:
        guess = num_tokens - len(prefix_ids)
        for length in _near(guess, MAX_FIXUP_TOKENS):
            body = self._tokenizer.decode(body_ids[:length])
            text = prefix + body
            # A cut inside a multi-byte character is not real text; one after whitespace would merge
            # with whatever follows it if this text is ever used as a prefix.
            if REPLACEMENT_CHAR in body or text[-1:].isspace():
                continue
            ids = self._tokenizer.encode(text)
            if len(ids) == num_tokens and ids[: len(prefix_ids)] == prefix_ids:
                return text
        return None


def _near(center: int, radius: int) -> Iterator[int]:
    """center, center-1, center+1, center-2, ... within radius, never below 0."""
    yield center
    for step in range(1, radius + 1):
        if center - step >= 0:
            yield center - step
        yield center + step


def _shuffled_forever(items: Sequence[int], rng: np.random.Generator) -> Iterator[int]:
    while True:
        for index in rng.permutation(len(items)):
            yield items[index]
