"""Configuration: one frozen dataclass per role, validated when it is built.

Components take the scalars they need (``BlockPool(num_blocks, block_size)``), never the
root config; these classes exist so that a bad setting fails at start-up with a sentence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder, read from GGUF metadata or an HF config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies over all layers, at 4 bytes per element."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * 4


PROPOSERS = ("ngram", "draft", "layer_skip")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding for one engine.

    num_speculative_tokens: k for requests that do not set their own; max_speculative_tokens
    bounds what a request (or the router) may ask for. draft_model: a model file or folder for
    the "draft" proposer (None: the target itself, which accepts every draft). skip_layers:
    the layers "layer_skip" leaves out (None: every other layer of the middle half).
    """

    proposer: str
    num_speculative_tokens: int = 3
    max_speculative_tokens: int = 8
    ngram_min: int = 2
    ngram_max: int = 4
    draft_model: str | None = None
    skip_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.proposer not in PROPOSERS:
            raise ValueError(f"proposer must be one of {', '.join(PROPOSERS)}, got {self.proposer!r}")
        if not 0 <= self.num_speculative_tokens <= self.max_speculative_tokens:
            raise ValueError(
                f"num_speculative_tokens must be in [0, max_speculative_tokens={self.max_speculative_tokens}], "
                f"got {self.num_speculative_tokens}"
            )
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"ngram sizes need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.skip_layers is not None:
            object.__setattr__(self, "skip_layers", tuple(self.skip_layers))


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine (one worker process).

    model: a GGUF file or an HF folder; None means the default SmolLM2-135M-Instruct.
    num_kv_blocks: None sizes the cache from kv_cache_bytes.
    max_num_batched_tokens: the per-step token budget that chunks long prefills.
    """

    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        positive = ("block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("num_kv_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive when given, got {value}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]
