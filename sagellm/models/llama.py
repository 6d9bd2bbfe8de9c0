"""Llama-family decoder (Llama, Mistral, Qwen2) running on a flat token batch with a paged KV cache.

One forward pass takes the concatenated tokens of every scheduled request (prefill chunks and
decodes alike), so linear layers see one `[num_tokens, hidden]` matrix; only attention is
per-request, through `paged_attention`. Q/K/V and gate/up projections are fused into single matmuls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sagellm.accel.linear import Linear
from sagellm.models.attention import AttentionMetadata, PagedKVCache, paged_attention, write_kv
from sagellm.models.shape import ModelShape


def rope_inverse_frequencies(shape: ModelShape) -> torch.Tensor:
    """Inverse frequencies of RoPE, with linear or Llama-3 scaling applied."""
    dim = shape.head_dim
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = shape.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling kind {scaling.kind!r} is not supported (linear, llama3)")


class RotaryEmbedding:
    """Cos/sin tables for positions `0 .. max_positions - 1` in the half-split (rotate_half) layout."""

    def __init__(self, shape: ModelShape, max_positions: int, dtype: torch.dtype, device: torch.device):
        inv_freq = rope_inverse_frequencies(shape)
        pos = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(pos, inv_freq)
        self.cos = freqs.cos().to(dtype=torch.float32, device=device)
        self.sin = freqs.sin().to(dtype=torch.float32, device=device)
        self.dtype = dtype

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[N, 1, D/2]` cos and sin for the given positions, in the model dtype."""
        cos = self.cos.index_select(0, positions).unsqueeze(1).to(self.dtype)
        sin = self.sin.index_select(0, positions).unsqueeze(1).to(self.dtype)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (`[N, H, D]`) with rotate_half convention: pairs are (i, i + D/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class DecoderLayer:
    """One transformer block's weights (fused) and its forward pass."""

    def __init__(self, shape: ModelShape, weights: dict[str, torch.Tensor], index: int, pack: bool = False) -> None:
        p = f"model.layers.{index}."
        self.shape = shape
        self.input_norm = weights[p + "input_layernorm.weight"]
        self.post_norm = weights[p + "post_attention_layernorm.weight"]
        qkv_bias = None
        if shape.attention_bias:
            qkv_bias = torch.cat([weights[p + f"self_attn.{n}_proj.bias"] for n in ("q", "k", "v")])
        self.qkv = Linear(
            torch.cat([weights[p + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")], dim=0).contiguous(),
            qkv_bias,
            pack,
        )
        self.o_proj = Linear(weights[p + "self_attn.o_proj.weight"], None, pack)
        self.gate_up = Linear(
            torch.cat([weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]], dim=0).contiguous(),
            None,
            pack,
        )
        self.down = Linear(weights[p + "mlp.down_proj.weight"], None, pack)
        self.scale = 1.0 / math.sqrt(shape.head_dim)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        s = self.shape
        n = hidden.shape[0]
        x = rms_norm(hidden, self.input_norm, s.rms_norm_eps)
        qkv = self.qkv(x)
        q, k, v = qkv.split([s.q_size, s.kv_size, s.kv_size], dim=-1)
        q = apply_rope(q.view(n, s.num_heads, s.head_dim), cos, sin)
        k = apply_rope(k.view(n, s.num_kv_heads, s.head_dim), cos, sin)
        v = v.reshape(n, s.num_kv_heads, s.head_dim)
        k_cache, v_cache = kv
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        att = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
        hidden = hidden + self.o_proj(att.reshape(n, s.q_size))
        x = rms_norm(hidden, self.post_norm, s.rms_norm_eps)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return hidden + self.down(F.silu(gate) * up)


class LlamaModel:
    """A Llama-family causal LM over HF-named weights.

    Contract: `forward(token_ids, positions, kv_cache, meta, logit_rows)` writes the K/V of every
    input token into `kv_cache` at `meta.slot_mapping` and returns float32 logits `[len(logit_rows),
    vocab]` for the requested flat rows only. The weights are not copied when already in `dtype`;
    with `pack_weights`, bfloat16 weights on the CPU are pre-packed for oneDNN (`sagellm.accel`).
    """

    def __init__(self, shape: ModelShape, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device, max_positions: int, pack_weights: bool = False) -> None:
        self.shape = shape
        self.dtype = dtype
        self.device = device
        w = {name: t.to(device=device, dtype=dtype) for name, t in weights.items()}
        self.embed = w["model.embed_tokens.weight"]
        self.lm_head = Linear(self.embed if shape.tie_word_embeddings else w["lm_head.weight"], None, pack_weights)
        self.norm = w["model.norm.weight"]
        self.layers = [DecoderLayer(shape, w, i, pack_weights) for i in range(shape.num_layers)]
        self.rope = RotaryEmbedding(shape, max_positions, dtype, device)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: PagedKVCache,
        meta: AttentionMetadata,
        logit_rows: torch.Tensor,
    ) -> torch.Tensor:
        hidden = self.embed.index_select(0, token_ids)
        cos, sin = self.rope.tables(positions)
        before_layer = meta.before_layer
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                before_layer(i)
            hidden = layer.forward(hidden, cos, sin, kv_cache.layer(i), meta)
        last = hidden.index_select(0, logit_rows)
        last = rms_norm(last, self.norm, self.shape.rms_norm_eps)
        return self.lm_head(last).float()
