"""Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) over a paged KV cache.

The model sees one flat row per scheduled token of every request in the step (no padding
between requests) and an ``AttentionMetadata`` that says where each row's K/V goes and which
cache slots each row may attend to. The runner builds that metadata; the model owns only math.
Weights are held fused (QKV in one matrix, gate and up in one) so each layer runs four GEMMs,
each a ``splitserve.engine.linear`` projection: in the model's dtype (prepacked for oneDNN on
CPU), or int8 weight-only with ``quantization="int8"``. Norms, RoPE, attention and the KV cache
run in the model's dtype; the logits come back in fp32. A layer's work before and after its
attention is two pure functions (``before_attention``, ``after_attention``), which the forward
takes as ``LayerStages``: the compiled forward (splitserve.engine.compiled) hands in compiled ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from splitserve.config import ModelConfig
from splitserve.engine.linear import Int8Linear, Linear, make_linear


@dataclass
class ShortGroup:
    """Requests with few new tokens (decode, speculative verification), padded to a batch.

    rows: [B, Q] flat row of each query (padding repeats a valid row; its output is dropped).
    valid_rows: flat rows of the real queries, in the order of ``query_mask``'s True entries.
    query_mask: [B, Q] True where the query is real.
    blocks: [B * N] each request's first N block ids (padded with block 0); key j of request
        b is position j of that request.
    mask: [B, 1, G*Q, N*block_size] True where a query may attend to a key (causal).
    """

    rows: torch.Tensor
    valid_rows: torch.Tensor
    query_mask: torch.Tensor
    blocks: torch.Tensor
    mask: torch.Tensor


@dataclass
class PackedGroup:
    """Prefill chunks packed end to end with a block-diagonal causal mask (no padding).

    rows: [T] flat rows of the queries; blocks: the block tables of all the requests,
    concatenated (S = len(blocks) * block_size keys); mask: [1, 1, G*T, S] True where a query
    may attend to a key.
    """

    rows: torch.Tensor
    blocks: torch.Tensor
    mask: torch.Tensor


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    block_size: int
    short: ShortGroup | None
    packed: PackedGroup | None


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear | Int8Linear
    o_proj: Linear | Int8Linear
    post_norm: torch.Tensor
    gate_up: Linear | Int8Linear
    down: Linear | Int8Linear


# ------------------------------------------------------------------------- pure functions


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, as the reference implementation does (one fused op in fp32)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_positions, head_dim] in HF's rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, D] for each row's position."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Copy whole blocks out of a layer's cache [slots, KV, D] -> [len(blocks) * block_size, KV, D]."""
    by_block = cache.view(-1, block_size, *cache.shape[1:])
    return by_block.index_select(0, blocks).view(-1, *cache.shape[1:])


def short_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: ShortGroup, scale: float, block_size: int
) -> torch.Tensor:
    """Attention for padded short queries. q: [T, KV, G, D]; returns [num valid rows, KV*G*D]."""
    batch, num_q = group.rows.shape
    _, num_kv, num_groups, dim = q.shape
    k = gather_blocks(k_cache, group.blocks, block_size).view(batch, -1, num_kv, dim).transpose(1, 2)
    v = gather_blocks(v_cache, group.blocks, block_size).view(batch, -1, num_kv, dim).transpose(1, 2)
    if num_q == 1:  # plain decode: one row per request, already in batch order
        out = F.scaled_dot_product_attention(q[:batch], k, v, attn_mask=group.mask, scale=scale)
        return out.reshape(batch, num_kv * num_groups * dim)
    qg = q[group.rows].permute(0, 2, 3, 1, 4).reshape(batch, num_kv, num_groups * num_q, dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=group.mask, scale=scale)
    out = out.reshape(batch, num_kv, num_groups, num_q, dim).permute(0, 3, 1, 2, 4)
    return out[group.query_mask].reshape(-1, num_kv * num_groups * dim)


def packed_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: PackedGroup, scale: float, block_size: int
) -> torch.Tensor:
    """Attention for packed prefill rows. q: [T, KV, G, D]; returns [len(rows), KV*G*D]."""
    num_rows = group.rows.shape[0]
    _, num_kv, num_groups, dim = q.shape
    qg = q[group.rows].permute(1, 2, 0, 3).reshape(1, num_kv, num_groups * num_rows, dim)
    k = gather_blocks(k_cache, group.blocks, block_size).permute(1, 0, 2).unsqueeze(0)
    v = gather_blocks(v_cache, group.blocks, block_size).permute(1, 0, 2).unsqueeze(0)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=group.mask, scale=scale)
    out = out.reshape(num_kv, num_groups, num_rows, dim).permute(2, 0, 1, 3)
    return out.reshape(num_rows, num_kv * num_groups * dim)


def before_attention(
    x: torch.Tensor, w: LayerWeights, cos: torch.Tensor, sin: torch.Tensor, c: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer up to attention: input norm, QKV projection, RoPE. q [T, H, D]; k, v [T, KV, D]."""
    h = w.qkv(rms_norm(x, w.input_norm, c.rms_norm_eps))
    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    qk, v = h.split([q_size + kv_size, kv_size], dim=-1)
    qk = apply_rope(qk.view(-1, c.num_heads + c.num_kv_heads, c.head_dim), cos, sin)  # Q and K at once
    q, k = qk.split([c.num_heads, c.num_kv_heads], dim=1)
    return q, k, v.view(-1, c.num_kv_heads, c.head_dim)


def after_attention(x: torch.Tensor, attn_out: torch.Tensor, w: LayerWeights, eps: float) -> torch.Tensor:
    """A layer from attention's output on: o-proj and residual, post norm, SwiGLU MLP and residual."""
    x = x + w.o_proj(attn_out)
    gate, up = w.gate_up(rms_norm(x, w.post_norm, eps)).chunk(2, dim=-1)
    return x + w.down(F.silu(gate) * up)


@dataclass(frozen=True)
class LayerStages:
    """A decoder layer's two halves around its paged attention: ``before_attention`` and
    ``after_attention`` as they are, or compiled (splitserve.engine.compiled)."""

    before_attention: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    after_attention: Callable[..., torch.Tensor]


EAGER_STAGES = LayerStages(before_attention, after_attention)


# --------------------------------------------------------------------------------- model


class Model:
    """A Llama/Qwen2-style decoder. ``forward`` reads and writes the paged KV cache it is given."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: str,
        quantization: str | None = None,
    ):
        """quantization: None keeps every projection in ``dtype``; "int8" quantizes them (the
        LM head too) from the loaded fp32 weights (see splitserve.engine.linear)."""
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.quantization = quantization
        self._weights = weights
        embed = "model.embed_tokens.weight"
        self.embed = self._take(embed)
        self.lm_head = self._linear([embed if config.tie_word_embeddings else "lm_head.weight"])
        self.norm = self._take("model.norm.weight")
        self.layers = [self._layer(i) for i in range(config.num_layers)]
        del self._weights
        cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.cos = cos.to(self.device, dtype)
        self.sin = sin.to(self.device, dtype)
        self.scale = config.head_dim**-0.5

    def _take(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._weights[name].to(device=self.device, dtype=dtype or self.dtype).contiguous()

    def _linear(self, names: list[str], bias_names: list[str] | None = None) -> Linear | Int8Linear:
        """One projection from the named weights stacked by rows; int8 quantizes from fp32."""
        dtype = torch.float32 if self.quantization else self.dtype
        weight = torch.cat([self._take(n, dtype) for n in names]) if len(names) > 1 else self._take(names[0], dtype)
        bias = torch.cat([self._take(n) for n in bias_names]) if bias_names else None
        return make_linear(weight, bias, self.quantization)

    def _layer(self, i: int) -> LayerWeights:
        p = f"model.layers.{i}."
        qkv = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
        bias = [p + f"self_attn.{n}_proj.bias" for n in "qkv"] if self.config.attention_bias else None
        return LayerWeights(
            input_norm=self._take(p + "input_layernorm.weight"),
            qkv=self._linear(qkv, bias),
            o_proj=self._linear([p + "self_attn.o_proj.weight"]),
            post_norm=self._take(p + "post_attention_layernorm.weight"),
            gate_up=self._linear([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
            down=self._linear([p + "mlp.down_proj.weight"]),
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        logit_rows: torch.Tensor,
        layer_ids: Sequence[int] | None = None,
        on_layer: Callable[[int], None] | None = None,
        stages: LayerStages = EAGER_STAGES,
    ) -> torch.Tensor:
        """Run the decoder over flat rows; return fp32 logits [len(logit_rows), vocab].

        kv_cache: [num_layers, 2, num_slots, num_kv_heads, head_dim]. layer_ids restricts the
        pass to a subset of layers (self-speculation); skipped layers' caches are untouched.
        on_layer(i) runs once layer i's K/V are in the cache (a prefill worker starts sending
        them while the next layers compute). stages: the layers' halves around attention
        (compiled ones: splitserve.engine.compiled).
        """
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.cos[positions], self.sin[positions]
        for i in range(self.config.num_layers) if layer_ids is None else layer_ids:
            x = self._decoder_layer(x, self.layers[i], kv_cache[i], attn, cos, sin, stages)
            if on_layer is not None:
                on_layer(i)
        x = rms_norm(x[logit_rows], self.norm, self.config.rms_norm_eps)
        return self.lm_head(x).float()

    def _decoder_layer(
        self,
        x: torch.Tensor,
        w: LayerWeights,
        kv: torch.Tensor,
        attn: AttentionMetadata,
        cos: torch.Tensor,
        sin: torch.Tensor,
        stages: LayerStages,
    ) -> torch.Tensor:
        q, k, v = stages.before_attention(x, w, cos, sin, self.config)
        kv[0].index_copy_(0, attn.slot_mapping, k)
        kv[1].index_copy_(0, attn.slot_mapping, v)
        return stages.after_attention(x, self._attention(q, kv, attn), w, self.config.rms_norm_eps)

    def _attention(self, q: torch.Tensor, kv: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        c = self.config
        q = q.view(-1, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim)
        short, packed = attn.short, attn.packed
        if packed is None:
            assert short is not None, "a step needs at least one attention group"
            return short_attention(q, kv[0], kv[1], short, self.scale, attn.block_size)
        if short is None:
            return packed_attention(q, kv[0], kv[1], packed, self.scale, attn.block_size)
        out = q.new_empty(q.shape[0], c.num_heads * c.head_dim)
        out[short.valid_rows] = short_attention(q, kv[0], kv[1], short, self.scale, attn.block_size)
        out[packed.rows] = packed_attention(q, kv[0], kv[1], packed, self.scale, attn.block_size)
        return out
