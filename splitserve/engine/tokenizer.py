"""Text <-> token ids for the engine: the model's tokenizer, its chat template, and streaming detokenization.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the HF Rust library) built either from a GGUF file's
metadata (`from_gguf`, no `tokenizer.json` needed) or from a Hugging Face folder (`from_hf_folder`).
The API server calls `apply_chat_template` and `encode` on requests coming in; the output side
feeds generated ids to one `IncrementalDetokenizer` per request to stream text deltas.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

SUPPORTED_GGUF_MODELS = ("gpt2",)
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) that split every digit on its own before the
# GPT-2 regex, as these models' tokenizer.json do with `Digits(individual_digits=True)`.
DIGIT_SPLIT_PRES = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
REGEX_SPLIT_PRES = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# llama.cpp (like Llama 3's tokenizer.json) takes a piece that is itself a token whole, merges or not.
IGNORE_MERGES_PRES = frozenset({"llama-bpe", "llama3", "llama-v3"})

# Decode this many prompt tokens ahead of the output, so the first output token sees its context.
DETOKENIZE_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


def build_gguf_backend(metadata: Mapping[str, Any]) -> Backend:
    """A byte-level BPE `tokenizers.Tokenizer` from GGUF `tokenizer.*` metadata values (pure, no file I/O)."""
    model_type = metadata.get("tokenizer.ggml.model")
    if model_type not in SUPPORTED_GGUF_MODELS:
        raise ValueError(
            f"GGUF tokenizer model {model_type!r} is not supported; supported: {list(SUPPORTED_GGUF_MODELS)} "
            "(byte-level BPE)"
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    pre = metadata.get("tokenizer.ggml.pre", "default")
    # Added tokens keep their raw spelling in the vocab: BPE never looks them up (they are matched
    # whole before BPE runs), and keeping them there lets each added token reuse its file id.
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [_split_merge(merge) for merge in metadata.get("tokenizer.ggml.merges", ())]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in IGNORE_MERGES_PRES))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(backend, tokens, metadata.get("tokenizer.ggml.token_type", ()))
    return backend


def _split_merge(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep:
        raise ValueError(f"GGUF merge {merge!r} is not two tokens separated by a space")
    return left, right


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The split matching llama.cpp's `tokenizer.ggml.pre`; unknown names get plain GPT-2 splitting."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in REGEX_SPLIT_PRES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(REGEX_SPLIT_PRES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return byte_level


def _add_gguf_added_tokens(backend: Backend, tokens: list[str], token_types: Sequence[int]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so both are
    matched whole in text (as llama.cpp does) instead of being cut into byte pieces."""
    typed = list(zip(tokens, token_types, strict=False))  # older files may lack token_type
    control = [t for t, kind in typed if kind == TOKEN_TYPE_CONTROL]
    user = [t for t, kind in typed if kind == TOKEN_TYPE_USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _read_gguf_tokenizer_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes a special token either as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """Newer transformers save the template as chat_template.jinja; older ones inside tokenizer_config.json,
    either as one string or as a list of named templates of which "default" is used."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        return named.get("default")
    return value if isinstance(value, str) else None


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template rejected the messages: {message}")


class Tokenizer:
    """The model's tokenizer: encode/decode, special tokens, and the chat template.

    Built once per engine from the model file; read-only afterwards, so it is safe to share between
    requests. BOS is added by `encode` only when the model asks for it (`add_bos_token`).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos_token: bool,
        chat_template: str | None,
    ) -> None:
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self._special_ids = frozenset(
            index for index, token in backend.get_added_tokens_decoder().items() if token.special
        )

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """The tokenizer described by a GGUF file's `tokenizer.*` metadata."""
        metadata = _read_gguf_tokenizer_metadata(reader)
        return cls(
            build_gguf_backend(metadata),
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
            add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_folder(cls, folder: Path) -> Tokenizer:
        """The tokenizer in a Hugging Face folder: tokenizer.json, plus tokenizer_config.json if present."""
        folder = Path(folder)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"no tokenizer.json in {folder}: a Hugging Face tokenizer folder needs one")
        backend = Backend.from_file(str(tokenizer_file))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        bos_id = _token_id(backend, _token_content(config.get("bos_token")))
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            # No flag: follow tokenizer.json's post-processor, which is where HF keeps the BOS rule then.
            add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_id=_token_id(backend, _token_content(config.get("eos_token"))),
            add_bos_token=bool(add_bos),
            chat_template=_hf_chat_template(folder, config),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def is_special(self, token_id: int) -> bool:
        """Whether the id is a special (control) token, which `decode` skips by default."""
        return token_id in self._special_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for text; special-token strings in it (e.g. "<|im_start|>") become their single id."""
        # The backend's own post-processor is bypassed so BOS follows `add_bos_token` alone.
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for token ids; incomplete UTF-8 at either end shows as U+FFFD."""
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a chat, rendered the way HF transformers renders chat templates."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        _check_messages(messages)
        return self._compiled_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_token_id),
            eos_token=self._token_text(self.eos_token_id),
        )

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        # Same environment settings as transformers, so templates written for HF render identically.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_template_error
        assert self.chat_template is not None, "compiled only after the None check"
        return env.from_string(self.chat_template)

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._backend.id_to_token(token_id) or ""


def _token_id(backend: Backend, token: str | None) -> int | None:
    return None if token is None else backend.token_to_id(token)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            kind = type(message).__name__
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {kind}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"message {index} needs a string {key!r}, got {message.get(key)!r}")


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text deltas, never splitting a multi-byte character.

    Uses vLLM's prefix_offset/read_offset technique: decode only the window from `prefix_offset`,
    emit the part beyond what the window up to `read_offset` already produced, and hold back while
    the text ends with U+FFFD (a character whose bytes have not all arrived). One per request, fed
    by the output processor; cost per call is a decode of a few tokens, not of the whole output.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # A few prompt tokens give the first output token its context (some decoders strip a
        # leading space at the start of a sequence); they are never emitted themselves.
        self._token_ids = list(prompt_token_ids[-DETOKENIZE_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self.text = ""

    def add(self, new_token_ids: Sequence[int]) -> str:
        """Append generated ids; returns the text they completed (possibly "")."""
        self._token_ids.extend(new_token_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._token_ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """At the end of generation: the held-back tail, even if it is an incomplete character."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._token_ids))
        return self._emit(new_text[len(prefix_text) :]) if len(new_text) > len(prefix_text) else ""

    def _emit(self, delta: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        self.text += delta
        return delta

    def _decode(self, start: int, end: int) -> str:
        window = self._token_ids[start:end]
        return self._tokenizer.decode(window, skip_special_tokens=self._skip_special_tokens)
