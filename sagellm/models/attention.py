"""Paged attention over a block-structured KV cache, for a step that mixes prefill chunks and decodes.

Cache layout, per layer: K and V each `[num_blocks, block_size, num_kv_heads, head_dim]`, so one
block is one contiguous piece of memory and gathering a request's blocks is a row gather. A request
reads only the blocks of its own block table. Decodes (one query token each) are batched together;
each prefill chunk attends to its own context with a causal mask offset by its start position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """One request's chunk: flat token rows `[row_start, row_start + num_tokens)` at positions
    `start_position ..`; `block_ids` covers its whole context `start_position + num_tokens`."""

    row_start: int
    num_tokens: int
    start_position: int
    block_ids: torch.Tensor


@dataclass
class AttentionMetadata:
    """Per-step tensors shared by every layer (built once by the model runner).

    `slot_mapping[i]` is the cache slot (block * block_size + offset) of flat token i.
    Decodes are the flat rows `decode_rows`; `decode_block_tables` is `[B, max_blocks]` padded with
    any valid block id, and `decode_mask_bias` is `[1, B, 1, max_blocks * block_size]` holding 0 for
    positions within each context and -inf beyond.
    """

    slot_mapping: torch.Tensor
    decode_rows: torch.Tensor | None
    decode_block_tables: torch.Tensor | None
    decode_mask: torch.Tensor | None
    prefills: list[PrefillChunk]
    block_size: int
    decode_lens: torch.Tensor | None = None
    decode_kernel: Callable | None = None
    before_layer: Callable[[int], None] | None = None  # e.g. wait for that layer's KV loads


class PagedKVCache:
    """The KV tensors of every layer: `[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`.

    Side effects: `write` stores new K/V rows in place at their slots.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        num_blocks: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.tensor = torch.zeros(
            (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype, device=device
        )

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensor[index, 0], self.tensor[index, 1]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store `k`, `v` (`[N, num_kv_heads, head_dim]`) at `slot_mapping` (`[N]`)."""
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, k)
    v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention for one layer. `q` is `[N, Hq, D]`, `k`/`v` `[N, Hkv, D]` (already in the cache).

    Returns `[N, Hq, D]`.
    """
    n_tokens, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    out = torch.empty_like(q)

    bs = meta.block_size
    if meta.decode_rows is not None and meta.decode_kernel is not None:
        rows = meta.decode_rows
        qd = q.index_select(0, rows)
        att = meta.decode_kernel(qd, k_cache, v_cache, meta.decode_block_tables, meta.decode_lens, scale)
        out.index_copy_(0, rows, att)
    elif meta.decode_rows is not None:
        rows = meta.decode_rows
        tables = meta.decode_block_tables
        b, max_blocks = tables.shape
        span = max_blocks * bs
        flat = tables.reshape(-1)
        keys = k_cache.index_select(0, flat).view(b, span, n_kv, head_dim).transpose(1, 2)
        values = v_cache.index_select(0, flat).view(b, span, n_kv, head_dim).transpose(1, 2)
        # The `group` query heads sharing a KV head act as `group` query rows of one head.
        qd = q.index_select(0, rows).view(b, n_kv, group, head_dim)
        att = F.scaled_dot_product_attention(qd, keys, values, attn_mask=meta.decode_mask, scale=scale)
        out.index_copy_(0, rows, att.reshape(b, n_heads, head_dim))

    for chunk in meta.prefills:
        r0, n = chunk.row_start, chunk.num_tokens
        qc = q[r0 : r0 + n].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if chunk.start_position == 0:
            kc = k[r0 : r0 + n].transpose(0, 1).unsqueeze(0)
            vc = v[r0 : r0 + n].transpose(0, 1).unsqueeze(0)
            att = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=True)
        else:
            ctx = chunk.start_position + n
            nb = chunk.block_ids.numel()
            kc = k_cache.index_select(0, chunk.block_ids).view(nb * bs, n_kv, head_dim)[:ctx]
            vc = v_cache.index_select(0, chunk.block_ids).view(nb * bs, n_kv, head_dim)[:ctx]
            q_pos = torch.arange(chunk.start_position, ctx, device=q.device)
            k_pos = torch.arange(ctx, device=q.device)
            mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # [n, ctx]
            att = F.scaled_dot_product_attention(
                qc, kc.transpose(0, 1).unsqueeze(0), vc.transpose(0, 1).unsqueeze(0),
                attn_mask=mask, scale=scale, enable_gqa=True,
            )
        out[r0 : r0 + n] = att.squeeze(0).transpose(0, 1)
    return out
