"""Tokenizer tests; the oracle is HF transformers reading the same GGUF file (offline)."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import transformers

from splitserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer, build_gguf_backend

# Strings on which our tokenizer and HF's GGUF conversion must give identical ids.
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "multiple   spaces   inside",
    "   ",
    "",
    "line one\nline two\n\nline four",
    "tabs\tand\ttabs\t\tdouble",
    "\n\n\n",
    "12345 3.14159",
    "Call 555-0100 or +1 (800) 123.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)",
    "{'key': [1, 2, 3], \"other\": None}",
    "Wait... what?! Yes!!! (maybe) -- no; ok: fine.",
    "I'm sure you're right, it's what we'd've done.",
    "café naïve résumé Ångström",
    "日本語のテキストです。",
    "中文和English混合",
    "Привет, мир!",
    "emoji 🤖👍🏽🎉 and a family 👨‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "not special: <|im_start and im_end|>",
    "<repo_name>splitserve<file_sep>tokenizer.py",
    "https://example.com/path?q=1&r=two#frag",
    "CamelCaseIdentifier snake_case_name SHOUTING",
    "x = 1  # comment\ny = x ** 2",
]

# Whitespace run before a digit: the "smollm" pre-tokenizer splits digits off first (the model's own
# tokenizer.json does Digits(individual_digits=True) then ByteLevel; llama.cpp does the same), so the
# whole run stays one piece. HF's GGUF conversion ignores tokenizer.ggml.pre="smollm" and splits it.
DIGIT_SPLIT_CASES = {
    "x  42": ["x", "ĠĠ", "4", "2"],
    "  1": ["ĠĠ", "1"],
    "a\n\n12": ["a", "ĊĊ", "1", "2"],
    "abc   7 apples": ["abc", "ĠĠĠ", "7", "Ġapples"],
}

DETOKENIZE_TEXTS = [
    "Hello, world! How are you today?",
    "café naïve résumé",
    "日本語のテキストです。中文也可以。",
    "emoji 🤖👍🏽🎉 family 👨‍👩‍👧 end",
    "def f(x):\n    return x  + 1\n",
    "<|im_start|>assistant\nSure 🎉<|im_end|>",
]

MESSAGES = {
    "user": [{"role": "user", "content": "What is 2+2?"}],
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 🐍."},
    ],
}


@pytest.fixture(scope="module")
def tok(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(gguf_path))


@pytest.fixture(scope="module")
def hf_tok(gguf_path: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_special_ids_and_sizes(tok: Tokenizer, hf_tok: transformers.PreTrainedTokenizerBase) -> None:
    assert tok.vocab_size == len(hf_tok)
    assert tok.bos_token_id == hf_tok.bos_token_id
    assert tok.eos_token_id == hf_tok.eos_token_id
    assert tok.eos_token_id is not None and tok.is_special(tok.eos_token_id)
    assert not tok.is_special(tok.encode("hello")[0])


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf(tok: Tokenizer, hf_tok: transformers.PreTrainedTokenizerBase, text: str) -> None:
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)


def test_special_token_strings_become_single_ids(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[-1] == tok.eos_token_id


@pytest.mark.parametrize("text", sorted(DIGIT_SPLIT_CASES))
def test_smollm_digit_split(tok: Tokenizer, hf_tok: transformers.PreTrainedTokenizerBase, text: str) -> None:
    assert hf_tok.convert_ids_to_tokens(tok.encode(text)) == DIGIT_SPLIT_CASES[text]
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_hf(
    tok: Tokenizer, hf_tok: transformers.PreTrainedTokenizerBase, text: str, skip: bool
) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    if not skip:
        assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_chat_template_matches_hf(
    tok: Tokenizer, hf_tok: transformers.PreTrainedTokenizerBase, name: str
) -> None:
    messages = MESSAGES[name]
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected
    no_prompt = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == no_prompt


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user"}], "message 0 .*'content'"),
        ([{"role": "user", "content": "ok"}, {"content": "no role"}], "message 1 .*'role'"),
        ([{"role": "user", "content": 5}], "message 0 .*'content'"),
        (["just a string"], "message 0 must be a dict"),
        ("not a list", "must be a list"),
    ],
)
def test_chat_template_rejects_bad_messages(tok: Tokenizer, messages: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


def test_chat_template_missing(tok: Tokenizer) -> None:
    bare = Tokenizer(
        tok._backend, bos_token_id=None, eos_token_id=None, add_bos_token=False, chat_template=None
    )
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(MESSAGES["user"])


def test_add_bos_token_prepends_bos(tok: Tokenizer) -> None:
    with_bos = Tokenizer(tok._backend, bos_token_id=1, eos_token_id=2, add_bos_token=True, chat_template=None)
    assert with_bos.encode("hi") == [1, *tok.encode("hi")]
    assert with_bos.encode("hi", add_special_tokens=False) == tok.encode("hi")


def test_from_hf_folder(tok: Tokenizer, hf_tok: transformers.PreTrainedTokenizerBase, tmp_path: Path) -> None:
    hf_tok.save_pretrained(tmp_path)
    folder_tok = Tokenizer.from_hf_folder(tmp_path)
    assert (folder_tok.bos_token_id, folder_tok.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert folder_tok.vocab_size == tok.vocab_size
    assert folder_tok.chat_template == tok.chat_template
    for text in TEXTS:
        assert folder_tok.encode(text) == tok.encode(text), text
    # The saved tokenizer.json carries HF's conversion, so it follows HF on the digit cases too.
    for text in DIGIT_SPLIT_CASES:
        assert folder_tok.encode(text) == hf_tok.encode(text), text


def test_from_hf_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path / "does-not-exist")


def test_unsupported_gguf_model_type() -> None:
    with pytest.raises(ValueError, match=r"'llama'.*supported.*gpt2"):
        build_gguf_backend({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})


def test_unknown_pre_falls_back_to_byte_level() -> None:
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "some-future-model",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "Ġ", "Ġab", "<s>"],
        "tokenizer.ggml.merges": ["a b", "Ġ ab"],
        "tokenizer.ggml.token_type": [1, 1, 1, 1, 1, 3],
    }
    backend = build_gguf_backend(metadata)
    assert backend.encode("ab ab<s>").ids == [2, 4, 5]
    assert backend.decode([2, 4, 5], skip_special_tokens=False) == "ab ab<s>"


def _stream(tok: Tokenizer, prompt: list[int], output: list[int], chunk: int, skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.add(output[i : i + chunk]) for i in range(0, len(output), chunk)]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("text", DETOKENIZE_TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer(tok: Tokenizer, text: str, chunk: int, skip: bool) -> None:
    prompt = tok.apply_chat_template(MESSAGES["user"])
    output = tok.encode(text)
    deltas = _stream(tok, tok.encode(prompt), output, chunk, skip)
    assert "".join(deltas) == tok.decode(output, skip_special_tokens=skip)
    assert all("\ufffd" not in delta for delta in deltas)
    assert deltas[-1] == ""  # valid text leaves nothing held back


def test_incremental_detokenizer_holds_back_partial_characters(tok: Tokenizer) -> None:
    output = tok.encode("🤖")
    assert len(output) > 1, "the emoji must span several byte tokens for this test to mean anything"
    detok = IncrementalDetokenizer(tok, tok.encode("Robot: "))
    assert [detok.add([token]) for token in output] == [""] * (len(output) - 1) + ["🤖"]


def test_incremental_detokenizer_flushes_incomplete_tail(tok: Tokenizer) -> None:
    output = tok.encode("ok 🤖")[:-1]  # cut the emoji's last byte token
    deltas = _stream(tok, [], output, 1, skip=True)
    assert "".join(deltas) == tok.decode(output)
    assert deltas[-1].endswith("\ufffd")
