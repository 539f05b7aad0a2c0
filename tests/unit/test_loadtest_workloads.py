"""Load-test workloads: parsing, Azure-shaped lengths, and real prompt text of an exact token count."""

from __future__ import annotations

import json

import numpy as np
import pytest

from splitserve.loadtest.texts import PromptWriter, code_corpus, prose_corpus
from splitserve.loadtest.workloads import (
    AZURE_LENGTHS,
    LengthLimits,
    WorkloadSpec,
    generate,
    load_tokenizer,
    parse_workload,
    sample_lengths,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()  # the default model's (SmolLM2), which adds no BOS


def quantiles(values) -> np.ndarray:
    return np.percentile(values, [10, 50, 90])


@pytest.mark.parametrize("kind", ["chat", "code"])
def test_sampled_lengths_follow_the_azure_table(kind):
    prompt_table, output_table = AZURE_LENGTHS[kind]
    lengths = np.array(sample_lengths(parse_workload(kind), 20_000, seed=1))
    for column, table in ((0, prompt_table), (1, output_table)):
        expected = [table.p10, table.p50, table.p90]
        assert quantiles(lengths[:, column]) == pytest.approx(expected, rel=0.05, abs=1)
    assert lengths[:, 0].mean() == pytest.approx(prompt_table.mean, rel=0.15)  # the mean is not fitted


def test_scale_keeps_the_shape():
    prompt_table, _ = AZURE_LENGTHS["chat"]
    lengths = np.array(sample_lengths(parse_workload("chat"), 20_000, seed=2, scale=0.125))
    expected = 0.125 * np.array([prompt_table.p10, prompt_table.p50, prompt_table.p90])
    assert quantiles(lengths[:, 0]) == pytest.approx(expected, rel=0.05, abs=1)
    assert lengths[:, 1].min() >= 1


def test_sampled_lengths_are_clamped_to_the_limits():
    limits = LengthLimits(min_prompt_tokens=50, max_prompt_tokens=300, max_output_tokens=20)
    lengths = np.array(sample_lengths(parse_workload("code"), 2_000, seed=0, limits=limits))
    assert lengths[:, 0].min() == 50 and lengths[:, 0].max() == 300
    assert lengths[:, 1].min() >= 1 and lengths[:, 1].max() == 20


def test_explicit_lengths_over_a_cap_raise():
    with pytest.raises(ValueError, match="exceed the cap"):
        sample_lengths(parse_workload("fixed:100/10"), 3, limits=LengthLimits(max_prompt_tokens=64))
    with pytest.raises(ValueError, match="exceed the cap"):
        sample_lengths(parse_workload("prefix:60/10/10"), 3, limits=LengthLimits(max_prompt_tokens=64))


@pytest.mark.parametrize("corpus", [prose_corpus, code_corpus])
def test_writer_hits_every_length_exactly(tokenizer, corpus):
    writer = PromptWriter(tokenizer, corpus(), np.random.default_rng(0))
    for num_tokens in [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987]:
        text = writer.write(num_tokens)
        assert len(tokenizer.encode(text)) == num_tokens
        assert "\ufffd" not in text and not text[-1].isspace()


@pytest.mark.parametrize("workload", ["chat", "code", "fixed:37/5", "prefix:50/20/4"])
def test_generated_prompts_have_exact_token_counts(tokenizer, workload):
    requests = generate(parse_workload(workload), 60, tokenizer, seed=4, scale=0.125)
    assert [r.index for r in requests] == list(range(60))
    assert all(len(tokenizer.encode(r.prompt)) == r.prompt_tokens for r in requests)
    assert all(r.category == workload.split(":")[0] and r.max_tokens >= 1 for r in requests)


def test_generate_is_seeded(tokenizer):
    spec = parse_workload("chat")
    first = generate(spec, 20, tokenizer, seed=5, scale=0.1)
    assert first == generate(spec, 20, tokenizer, seed=5, scale=0.1)
    assert first != generate(spec, 20, tokenizer, seed=6, scale=0.1)


def test_prefix_prompts_share_the_exact_prefix(tokenizer):
    requests = generate(parse_workload("prefix:64/16/8"), 20, tokenizer, seed=0)
    shared_ids = tokenizer.encode(requests[0].prompt)[:64]
    shared = tokenizer.decode(shared_ids)
    assert tokenizer.encode(shared) == shared_ids
    for request in requests:
        assert request.prompt.startswith(shared) and request.prompt_tokens == 80
        assert tokenizer.encode(request.prompt)[:64] == shared_ids  # a prefix cache sees all 64 tokens
    assert len({request.prompt for request in requests}) == 20


class WithBos:
    """The default tokenizer as if its model asked for BOS (as Llama's does): counts include it."""

    BOS = 1

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return [self.BOS, *self._tokenizer.encode(text)]

    def decode(self, token_ids) -> str:
        return self._tokenizer.decode([i for i in token_ids if i != self.BOS])


def test_counts_include_bos_when_the_tokenizer_adds_it(tokenizer):
    with_bos = WithBos(tokenizer)
    for workload in ("fixed:20/4", "prefix:10/5/4"):
        for request in generate(parse_workload(workload), 5, with_bos, seed=0):
            assert len(with_bos.encode(request.prompt)) == request.prompt_tokens
            assert len(tokenizer.encode(request.prompt)) == request.prompt_tokens - 1


def test_code_prompts_are_python_source(tokenizer):
    prompts = "".join(r.prompt for r in generate(parse_workload("code"), 20, tokenizer, seed=0, scale=0.1))
    assert "def " in prompts or "import " in prompts or "return " in prompts


def test_file_workload(tokenizer, tmp_path):
    path = tmp_path / "requests.jsonl"
    lines = [{"prompt": "Hello there, how are you?", "max_tokens": 7}, {"prompt_tokens": 25, "max_tokens": 3}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    requests = generate(parse_workload(f"file:{path}"), 5, tokenizer)
    assert [r.max_tokens for r in requests] == [7, 3, 7, 3, 7]  # the file is used again from the top
    assert requests[0].prompt == "Hello there, how are you?"
    assert requests[0].prompt_tokens == len(tokenizer.encode(requests[0].prompt))
    assert requests[1].prompt_tokens == 25 == len(tokenizer.encode(requests[1].prompt))
    assert requests[1].prompt != requests[3].prompt  # fresh text each time
    with pytest.raises(ValueError, match="exceed the cap"):
        generate(parse_workload(f"file:{path}"), 2, tokenizer, max_output_tokens=5)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"prompt": "hi"}', "max_tokens"),
        ('{"prompt": "hi", "max_tokens": 0}', "max_tokens"),
        ('{"max_tokens": 4}', "exactly one"),
        ('{"prompt": "hi", "prompt_tokens": 3, "max_tokens": 4}', "exactly one"),
        ('{"prompt": "", "max_tokens": 4}', "non-empty"),
        ('{"prompt_tokens": 2.5, "max_tokens": 4}', "whole number"),
    ],
)
def test_bad_file_lines_name_the_line(tokenizer, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "max_tokens": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
        generate(parse_workload(f"file:{path}"), 2, tokenizer)


def test_names_round_trip(tmp_path):
    path = tmp_path / "w.jsonl"
    path.touch()
    for text in ("chat", "code", "fixed:128/32", "prefix:512/64/16", f"file:{path}"):
        assert str(parse_workload(text)) == text
    assert parse_workload("prefix:512/64/16") == WorkloadSpec("prefix", input_tokens=64, output_tokens=16, shared_tokens=512)


@pytest.mark.parametrize(
    "text", ["", "sharegpt", "chat:2", "fixed", "fixed:10", "fixed:10/x", "fixed:0/5", "fixed:-1/5", "fixed:1/2/3",
             "prefix:1/2", "prefix:0/2/3", "file:", "file:/no/such/file.jsonl"],
)
def test_bad_names_raise(text):
    with pytest.raises(ValueError):
        parse_workload(text)


def test_bad_generation_arguments_raise(tokenizer):
    with pytest.raises(ValueError, match="scale"):
        generate(parse_workload("chat"), 3, tokenizer, scale=0)
    with pytest.raises(ValueError, match="num_requests"):
        generate(parse_workload("chat"), -1, tokenizer)
    with pytest.raises(ValueError, match="min_prompt_tokens"):
        generate(parse_workload("chat"), 3, tokenizer, min_prompt_tokens=10, max_prompt_tokens=5)
