"""The loader: tiny GGUF files of every supported tensor type against gguf-py and HF
transformers, the RoPE row un-permutation, and a clear ValueError for each kind of bad input.

The GGUF files are written here with ``gguf.GGUFWriter`` the way llama.cpp's converter writes
them (Q/K rows permuted for "llama", as-is for "qwen2"), with SmolLM2's tokenizer metadata, so
HF transformers can load the very same files as the oracle. gguf-py parses the ~98k strings of
the full 49152-token vocabulary at several seconds per open (and HF opens a file twice), so the
type x tying matrix uses SmolLM2's first 1024 tokens and their merges; one end-to-end case and
the default model's metadata keep the full vocabulary.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from splitserve import LLM, SamplingParams
from splitserve.engine.loader import load_model, unpermute_rope_rows
from splitserve.engine.model_files import default_model_path
from tests.conftest import PROMPTS
from tests.unit.test_model_vs_hf import _our_logits

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HIDDEN, NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, FFN = 64, 2, 4, 2, 16, 128
CONTEXT, ROPE_THETA, RMS_EPS = 256, 10000.0, 1e-5
FULL_VOCAB, SMALL_VOCAB = 49152, 1024

# GGUF name (after "blk.N.") -> (HF name (after "model.layers.N."), shape)
LAYER_TENSORS = {
    "attn_norm": ("input_layernorm", (HIDDEN,)),
    "ffn_norm": ("post_attention_layernorm", (HIDDEN,)),
    "attn_q": ("self_attn.q_proj", (NUM_HEADS * HEAD_DIM, HIDDEN)),
    "attn_k": ("self_attn.k_proj", (NUM_KV_HEADS * HEAD_DIM, HIDDEN)),
    "attn_v": ("self_attn.v_proj", (NUM_KV_HEADS * HEAD_DIM, HIDDEN)),
    "attn_output": ("self_attn.o_proj", (HIDDEN, NUM_HEADS * HEAD_DIM)),
    "ffn_gate": ("mlp.gate_proj", (FFN, HIDDEN)),
    "ffn_up": ("mlp.up_proj", (FFN, HIDDEN)),
    "ffn_down": ("mlp.down_proj", (HIDDEN, FFN)),
}
TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ROPE_HEADS = {"attn_q": NUM_HEADS, "attn_k": NUM_KV_HEADS}
SUPPORTED_TYPES = [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1]

TokenizerMetadata = dict[str, object]  # tokenizer.* GGUF metadata, keyed by the part after "tokenizer."


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute``: HF rotate-half rows -> pairs."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class GGUFTensor:
    name: str  # GGUF name
    data: np.ndarray  # as written: float32/float16 values, or quantized bytes
    qtype: QType
    rope_heads: int | None = None  # set when the rows were permuted for RoPE


@dataclass
class TinyModel:
    path: Path
    tensors: list[GGUFTensor]
    tied: bool


# ------------------------------------------------------------------------ writing GGUF files


@pytest.fixture(scope="module")
def full_tokenizer() -> TokenizerMetadata:
    """The default model's tokenizer metadata: vocabulary, merges, types, ids, chat template."""
    reader = gguf.GGUFReader(default_model_path())
    keys = ["chat_template"] + [
        f"ggml.{key}" for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id")
    ]
    metadata = {key: reader.fields[f"tokenizer.{key}"].contents() for key in keys}
    assert len(metadata["ggml.tokens"]) == FULL_VOCAB
    return metadata


@pytest.fixture(scope="module")
def small_tokenizer(full_tokenizer: TokenizerMetadata) -> TokenizerMetadata:
    """SmolLM2's first SMALL_VOCAB tokens (specials, bytes, early merges) and their merges."""
    tokens = full_tokenizer["ggml.tokens"][:SMALL_VOCAB]
    vocab = set(tokens)
    merges = [m for m in full_tokenizer["ggml.merges"] if set(m.split(" ")) <= vocab and m.replace(" ", "") in vocab]
    return {
        **full_tokenizer,
        "ggml.tokens": tokens,
        "ggml.token_type": full_tokenizer["ggml.token_type"][:SMALL_VOCAB],
        "ggml.merges": merges,
    }


def write_gguf(
    path: Path,
    arch: str,
    tokenizer: TokenizerMetadata,
    tensors: list[GGUFTensor],
    skip_keys: tuple[str, ...] = (),
    extra_keys: tuple[tuple[str, object, gguf.GGUFValueType], ...] = (),
) -> Path:
    """A GGUF file with the tiny model's hyperparameters; ``skip_keys`` leaves metadata out and
    ``extra_keys`` adds (key, value, type) entries."""
    writer = gguf.GGUFWriter(path, arch)
    kv = {
        f"{arch}.block_count": (writer.add_block_count, NUM_LAYERS),
        f"{arch}.context_length": (writer.add_context_length, CONTEXT),
        f"{arch}.embedding_length": (writer.add_embedding_length, HIDDEN),
        f"{arch}.feed_forward_length": (writer.add_feed_forward_length, FFN),
        f"{arch}.attention.head_count": (writer.add_head_count, NUM_HEADS),
        f"{arch}.attention.head_count_kv": (writer.add_head_count_kv, NUM_KV_HEADS),
        f"{arch}.rope.dimension_count": (writer.add_rope_dimension_count, HEAD_DIM),
        f"{arch}.rope.freq_base": (writer.add_rope_freq_base, ROPE_THETA),
        f"{arch}.attention.layer_norm_rms_epsilon": (writer.add_layer_norm_rms_eps, RMS_EPS),
        f"{arch}.vocab_size": (writer.add_vocab_size, len(tokenizer["ggml.tokens"])),
        "tokenizer.ggml.model": (writer.add_tokenizer_model, tokenizer["ggml.model"]),
        "tokenizer.ggml.pre": (writer.add_tokenizer_pre, tokenizer["ggml.pre"]),
        "tokenizer.ggml.tokens": (writer.add_token_list, tokenizer["ggml.tokens"]),
        "tokenizer.ggml.token_type": (writer.add_token_types, tokenizer["ggml.token_type"]),
        "tokenizer.ggml.merges": (writer.add_token_merges, tokenizer["ggml.merges"]),
        "tokenizer.ggml.bos_token_id": (writer.add_bos_token_id, tokenizer["ggml.bos_token_id"]),
        "tokenizer.ggml.eos_token_id": (writer.add_eos_token_id, tokenizer["ggml.eos_token_id"]),
        "tokenizer.chat_template": (writer.add_chat_template, tokenizer["chat_template"]),
    }
    for key, (add, value) in kv.items():
        if key not in skip_keys:
            add(value)
    for key, value, vtype in extra_keys:
        writer.add_key_value(key, value, vtype)
    for t in tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_tensors(qtype: QType, tied: bool, vocab: int, arch: str = "llama", seed: int = 0) -> list[GGUFTensor]:
    """Seeded random weights as llama.cpp writes them: norms and biases F32, matrices ``qtype``."""
    rng = np.random.default_rng(seed)

    def tensor(name: str, shape: tuple[int, ...], rope_heads: int | None = None) -> GGUFTensor:
        if len(shape) == 1:
            offset = 1.0 if name.endswith("norm.weight") else 0.0
            return GGUFTensor(name, (offset + 0.1 * rng.standard_normal(shape)).astype(np.float32), QType.F32)
        values = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        if rope_heads is not None:
            values = llama_cpp_permute(values, rope_heads)
        return GGUFTensor(name, gguf.quants.quantize(values, qtype), qtype, rope_heads)

    tensors = [tensor("token_embd.weight", (vocab, HIDDEN)), tensor("output_norm.weight", (HIDDEN,))]
    if not tied:
        tensors.append(tensor("output.weight", (vocab, HIDDEN)))
    for layer in range(NUM_LAYERS):
        for short, (_, shape) in LAYER_TENSORS.items():
            rope_heads = ROPE_HEADS.get(short) if arch == "llama" else None
            tensors.append(tensor(f"blk.{layer}.{short}.weight", shape, rope_heads))
        if arch == "qwen2":  # qwen2 has Q/K/V biases, which llama.cpp writes unpermuted
            for short in ("attn_q", "attn_k", "attn_v"):
                tensors.append(tensor(f"blk.{layer}.{short}.bias", (LAYER_TENSORS[short][1][0],)))
    return tensors


def tiny_model(
    folder: Path, tokenizer: TokenizerMetadata, qtype: QType = QType.F32, tied: bool = True, arch: str = "llama"
) -> TinyModel:
    tensors = tiny_tensors(qtype, tied, len(tokenizer["ggml.tokens"]), arch)
    return TinyModel(write_gguf(folder / f"tiny-{arch}.gguf", arch, tokenizer, tensors), tensors, tied)


# ----------------------------------------------------------------------- checking a model


def hf_name(gguf_name: str) -> str:
    base, _, kind = gguf_name.rpartition(".")
    if base in TOP_TENSORS:
        return f"{TOP_TENSORS[base]}.{kind}"
    _, layer, short = base.split(".")
    return f"model.layers.{layer}.{LAYER_TENSORS[short][0]}.{kind}"


def expected_weight(t: GGUFTensor) -> torch.Tensor:
    """gguf-py's dequantization of what was written, its rows put back in HF order."""
    values = gguf.quants.dequantize(t.data, t.qtype)
    if t.rope_heads is not None:
        # Written row i holds original row order[i]: scatter the rows back.
        order = llama_cpp_permute(np.arange(values.shape[0]), t.rope_heads)
        original = np.empty_like(values)
        original[order] = values
        values = original
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def assert_weights_match(tiny: TinyModel) -> None:
    config, weights, _ = load_model(tiny.path)
    vocab = tiny.tensors[0].data.shape[0]
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (vocab, HIDDEN, FFN)
    shape = (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim)
    assert shape == (NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
    assert (config.rope_theta, config.max_position_embeddings) == (ROPE_THETA, CONTEXT)
    assert config.rms_norm_eps == pytest.approx(RMS_EPS)
    assert config.tie_word_embeddings == tiny.tied
    assert set(weights) == {hf_name(t.name) for t in tiny.tensors}
    for t in tiny.tensors:
        actual = weights[hf_name(t.name)]
        assert actual.dtype == torch.float32
        torch.testing.assert_close(actual, expected_weight(t), atol=0, rtol=0, msg=lambda m: f"{t.name}: {m}")


def assert_logits_match_hf(path: Path, sequences: list[list[int]] | None = None) -> LLM:
    """Last-position logits of an engine on ``path`` against HF transformers on the same file.

    Without ``sequences``, random ids: two short ones (the padded attention path) and one of
    five blocks (packed prefill)."""
    transformers = pytest.importorskip("transformers")
    llm = LLM(model=str(path), num_kv_blocks=64)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    if sequences is None:
        rng = np.random.default_rng(1)
        vocab = llm.engine.model_config.vocab_size
        sequences = [rng.integers(0, vocab, n).tolist() for n in (1, 7, 5 * llm.engine.config.block_size + 3)]
    for ids in sequences:
        with torch.inference_mode():
            expected = hf_model(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(_our_logits(llm, ids), expected, atol=1e-4, rtol=1e-4)
    return llm


# ---------------------------------------------------------------- models: types and tying


@pytest.fixture(
    scope="module",
    params=[(q, tied) for q in SUPPORTED_TYPES for tied in (True, False)],
    ids=lambda p: f"{p[0].name}-{'tied' if p[1] else 'untied'}",
)
def tiny_llama(request, tmp_path_factory, small_tokenizer) -> TinyModel:
    qtype, tied = request.param
    return tiny_model(tmp_path_factory.mktemp("gguf"), small_tokenizer, qtype, tied)


def test_gguf_weights_are_gguf_dequantized_in_hf_row_order(tiny_llama):
    """Every weight equals gguf-py's dequantization of what was written, Q/K rows un-permuted."""
    assert_weights_match(tiny_llama)


def test_gguf_logits_match_hf_on_same_file(tiny_llama):
    """An engine on the tiny GGUF gives HF transformers' last-position logits (fp32)."""
    assert_logits_match_hf(tiny_llama.path)


def test_qwen2_gguf_q_and_k_are_not_unpermuted(tmp_path, small_tokenizer):
    """llama.cpp writes qwen2 Q/K weights and biases in HF's row order (NEOX RoPE)."""
    tiny = tiny_model(tmp_path, small_tokenizer, QType.Q8_0, tied=True, arch="qwen2")
    assert_weights_match(tiny)
    assert load_model(tiny.path)[0].attention_bias
    assert_logits_match_hf(tiny.path)


def test_full_vocabulary_gguf_end_to_end(tmp_path, full_tokenizer):
    """SmolLM2's whole tokenizer: text prompts encode with it, and logits match HF's."""
    tiny = tiny_model(tmp_path, full_tokenizer, QType.Q4_1, tied=False)
    llm = LLM(model=str(tiny.path), num_kv_blocks=64)
    sequences = [llm.tokenizer.encode(p) for p in PROMPTS[:2]]
    sequences.append(llm.tokenizer.encode(" ".join(PROMPTS)))  # many blocks: packed prefill
    assert llm.engine.model_config.vocab_size == FULL_VOCAB
    assert max(max(ids) for ids in sequences) >= SMALL_VOCAB
    assert_logits_match_hf(tiny.path, sequences)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    assert len(llm.generate("Hello", params)[0].token_ids) == 4


# ------------------------------------------------------------------------ RoPE permutation


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("head_dim", [2, 8, 64])
def test_unpermute_rope_rows_inverts_llama_cpp_permute(num_heads, head_dim):
    generator = torch.Generator().manual_seed(num_heads * 100 + head_dim)
    rows = num_heads * head_dim
    for shape in [(rows, 24), (rows,)]:  # a weight and a bias
        original = torch.randn(shape, generator=generator)
        permuted = torch.from_numpy(llama_cpp_permute(original.numpy(), num_heads))
        if head_dim > 2:
            assert not torch.equal(permuted, original)
        assert torch.equal(unpermute_rope_rows(permuted, num_heads), original)


def test_unpermute_rope_rows_maps_pairs_to_halves():
    """Row 2i of a head (pair i, first element) goes to row i, row 2i+1 to row i + head_dim/2."""
    rows = torch.arange(8.0)  # two heads of head_dim 4: pairs (0,1) (2,3) | (4,5) (6,7)
    assert unpermute_rope_rows(rows, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# ---------------------------------------------------------------------------- GGUF errors


def assert_load_error(path: Path, *expected: str, culprit: Path | None = None) -> None:
    """load_model(path) raises ValueError naming the culprit file (default: path) and ``expected``."""
    with pytest.raises(ValueError) as error:
        load_model(path)
    message = str(error.value)
    for text in (str(culprit or path), *expected):
        assert text in message, f"{text!r} not in {message!r}"


def test_missing_path(tmp_path):
    assert_load_error(tmp_path / "absent.gguf", "does not exist", "a .gguf file or an HF folder")


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 64)
    assert_load_error(path, "is not a .gguf file")


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_load_error(path, "cannot read GGUF file")


def test_truncated_gguf(tmp_path, small_tokenizer):
    whole = tiny_model(tmp_path, small_tokenizer).path
    path = tmp_path / "truncated.gguf"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # metadata intact, tensor data cut
    assert_load_error(path, "cannot read GGUF file")


def test_gguf_unsupported_architecture(tmp_path, small_tokenizer):
    path = tiny_model(tmp_path, small_tokenizer, arch="gptneox").path
    assert_load_error(path, "'gptneox'", "supported: llama, qwen2")


def test_gguf_unsupported_tensor_type(tmp_path, small_tokenizer):
    """gguf-py cannot quantize to Q6_K, so the tensor is random bytes of the right size (a Q6_K
    block holds 256 values in 210 bytes); the loader must refuse it before dequantizing."""
    tiny = tiny_model(tmp_path, small_tokenizer)
    down = next(t for t in tiny.tensors if t.name == "blk.0.ffn_down.weight")
    block_size, type_size = gguf.GGML_QUANT_SIZES[QType.Q6_K]
    down.data = np.random.default_rng(0).integers(0, 256, (down.data.size // block_size, type_size), dtype=np.uint8)
    down.qtype = QType.Q6_K
    path = write_gguf(tmp_path / "q6_k.gguf", "llama", small_tokenizer, tiny.tensors)
    assert {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}[down.name] == QType.Q6_K
    assert_load_error(path, "'blk.0.ffn_down.weight'", "is Q6_K", "supported: ", "Q4_1")


def test_gguf_missing_weight(tmp_path, small_tokenizer):
    tiny = tiny_model(tmp_path, small_tokenizer)
    tensors = [t for t in tiny.tensors if t.name != "blk.1.ffn_down.weight"]
    path = write_gguf(tmp_path / "partial.gguf", "llama", small_tokenizer, tensors)
    assert_load_error(path, "lacks 1 weights", "model.layers.1.mlp.down_proj.weight")


def test_gguf_unknown_tensor(tmp_path, small_tokenizer):
    """Llama 3.1's rope_freqs (RoPE scaling factors) is refused, not silently dropped."""
    tiny = tiny_model(tmp_path, small_tokenizer)
    tensors = [*tiny.tensors, GGUFTensor("rope_freqs.weight", np.ones(HEAD_DIM // 2, np.float32), QType.F32)]
    path = write_gguf(tmp_path / "rope_freqs.gguf", "llama", small_tokenizer, tensors)
    assert_load_error(path, "'rope_freqs.weight'")


@pytest.mark.parametrize(
    "key", ["llama.embedding_length", "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.tokens"]
)
def test_gguf_missing_metadata(tmp_path, small_tokenizer, key):
    tensors = tiny_tensors(QType.F32, True, SMALL_VOCAB)
    path = write_gguf(tmp_path / "no_key.gguf", "llama", small_tokenizer, tensors, skip_keys=(key,))
    assert_load_error(path, f"lacks the metadata field {key!r}")


def rope_scaling_keys(kind: str, factor: float) -> tuple[tuple[str, object, gguf.GGUFValueType], ...]:
    return (
        ("llama.rope.scaling.type", kind, gguf.GGUFValueType.STRING),
        ("llama.rope.scaling.factor", factor, gguf.GGUFValueType.FLOAT32),
    )


@pytest.mark.parametrize("kind, factor", [("linear", 4.0), ("yarn", 4.0), ("yarn", 1.0)])
def test_gguf_rope_scaling_is_refused(tmp_path, small_tokenizer, kind, factor):
    """llama.cpp's converter records linear and YaRN scaling as metadata; ignoring it would
    silently change every position's rotation."""
    tensors = tiny_tensors(QType.F32, True, SMALL_VOCAB)
    extra = rope_scaling_keys(kind, factor)
    path = write_gguf(tmp_path / "scaled.gguf", "llama", small_tokenizer, tensors, extra_keys=extra)
    assert_load_error(path, f"RoPE scaling {kind!r}", "only plain RoPE")


def test_gguf_linear_rope_scaling_by_one_is_plain_rope(tmp_path, small_tokenizer):
    tensors = tiny_tensors(QType.F32, True, SMALL_VOCAB)
    extra = rope_scaling_keys("linear", 1.0)
    path = write_gguf(tmp_path / "unscaled.gguf", "llama", small_tokenizer, tensors, extra_keys=extra)
    assert load_model(path)[0].rope_theta == ROPE_THETA


# ---------------------------------------------------------------------- HF folder errors

TINY_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": SMALL_VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": NUM_HEADS,
    "num_key_value_heads": NUM_KV_HEADS,
    "rms_norm_eps": RMS_EPS,
    "max_position_embeddings": CONTEXT,
    "rope_theta": ROPE_THETA,
    "tie_word_embeddings": True,
}
LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def write_hf_folder(folder: Path, config: dict[str, object]) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_hf_folder_without_config(tmp_path):
    assert_load_error(tmp_path, "has no config.json")


def test_hf_folder_without_safetensors(tmp_path):
    folder = write_hf_folder(tmp_path / "model", TINY_HF_CONFIG)
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 16)
    assert_load_error(folder, "has no *.safetensors files")


def test_hf_folder_unsupported_architecture(tmp_path):
    config = {**TINY_HF_CONFIG, "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}
    folder = write_hf_folder(tmp_path / "neox", config)
    expected = ("GPTNeoXForCausalLM", "'gpt_neox'", "supported: LlamaForCausalLM, Qwen2ForCausalLM")
    assert_load_error(folder, *expected, culprit=folder / "config.json")


@pytest.mark.parametrize(
    "rope, kind",
    [
        ({"rope_scaling": {"rope_type": "llama3", **LLAMA3_ROPE}}, "llama3"),  # transformers 4
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),  # older transformers 4
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3_ROPE}}, "llama3"),  # transformers 5
    ],
    ids=["rope_scaling", "rope_scaling-type", "rope_parameters"],
)
def test_hf_rope_scaling_is_refused(tmp_path, rope, kind):
    folder = write_hf_folder(tmp_path / "scaled", {**TINY_HF_CONFIG, **rope})
    assert_load_error(folder, f"RoPE scaling {kind!r}", "only plain RoPE", culprit=folder / "config.json")
