"""Turns a `SchedulerOutput` into one forward pass over the paged KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sagellm.accel.kernels import paged_decode_kernel
from sagellm.core.outputs import SchedulerOutput
from sagellm.models.attention import AttentionMetadata, PagedKVCache, PrefillChunk
from sagellm.models.llama import LlamaModel


class ModelRunner:
    """Executes scheduled token batches on a model and its KV cache.

    Contract: keeps each request's block table, applying `new_block_ids` (and
    `resets_block_table`) from every `SchedulerOutput`; drops the table of every id listed in
    `finished_ids` or `preempted_ids`. `execute` returns float32 logits for the requests that sample
    this step, in the order of `SchedulerOutput.scheduled`, with their ids, and the ids it left
    out because their context includes one of `bad_blocks` (blocks whose KV load failed). Side
    effect: writes the K/V of every computed token into the cache.
    """

    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, use_kernels: bool = True) -> None:
        self.model = model
        self.decode_kernel = paged_decode_kernel() if use_kernels and model.device.type == "cpu" else None
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = model.device
        self.block_tables: dict[str, list[int]] = {}

    def update_tables(self, out: SchedulerOutput) -> None:
        """Apply an output's block tables: forget finished and preempted requests, set or extend the
        scheduled ones'. `execute` does it first; an output with nothing to execute needs it alone."""
        for rid in out.finished_ids:
            self.block_tables.pop(rid, None)
        for rid in out.preempted_ids:
            self.block_tables.pop(rid, None)
        for s in out.scheduled:
            if s.resets_block_table:
                self.block_tables[s.request_id] = list(s.new_block_ids)
            else:
                self.block_tables[s.request_id].extend(s.new_block_ids)

    def execute(self, out: SchedulerOutput, bad_blocks: list[int] | None = None,
                before_layer: Callable[[int], None] | None = None) -> tuple[list[str], torch.Tensor, list[str]]:
        self.update_tables(out)
        skipped: list[str] = []
        scheduled = out.scheduled
        if bad_blocks:
            bad = set(bad_blocks)
            bs = self.block_size
            skipped = [s.request_id for s in scheduled
                       if bad.intersection(self.block_tables[s.request_id][: -(-s.context_length // bs)])]
            scheduled = [s for s in scheduled if s.request_id not in skipped]
        if not scheduled:
            return [], torch.empty(0), skipped
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        sampling_ids: list[str] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        for s in scheduled:
            table = self.block_tables[s.request_id]
            row0 = len(token_ids)
            start, n = s.start_position, len(s.token_ids)
            token_ids.extend(s.token_ids)
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if n == 1 and start > 0:
                decode_rows.append(row0)
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                nblocks = -(-(start + n) // bs)
                prefills.append(
                    PrefillChunk(row0, n, start, torch.tensor(table[:nblocks], dtype=torch.long, device=self.device))
                )
            if s.samples:
                logit_rows.append(row0 + n - 1)
                sampling_ids.append(s.request_id)

        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            decode_rows=None,
            decode_block_tables=None,
            decode_mask=None,
            prefills=prefills,
            block_size=bs,
            before_layer=before_layer,
        )
        if decode_rows:
            max_blocks = max(-(-n // bs) for n in decode_lens)
            padded = [t[:max_blocks] + [t[0]] * (max_blocks - min(len(t), max_blocks)) for t in decode_tables]
            lens = torch.tensor(decode_lens, dtype=torch.long, device=self.device)
            span = torch.arange(max_blocks * bs, device=self.device)
            mask = span.unsqueeze(0) < lens.unsqueeze(1)
            meta.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=self.device)
            meta.decode_block_tables = torch.tensor(padded, dtype=torch.long, device=self.device)
            meta.decode_mask = mask.view(len(decode_rows), 1, 1, max_blocks * bs)
            meta.decode_lens = lens
            meta.decode_kernel = self.decode_kernel

        logits = self.model.forward(
            torch.tensor(token_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            self.kv_cache,
            meta,
            torch.tensor(logit_rows, dtype=torch.long, device=self.device),
        )
        return sampling_ids, logits, skipped
