"""A torch-free stand-in for the engine's KV storage, for testing the KV runtime's decisions.

`ShadowKV` carries out a step's `KVOp`s and token writes the way the engine does, on lists of
token ids instead of tensors, and checks that every request reads exactly the tokens of its own
prefix: a wrong block id, a load from the wrong slot or an op out of order fails the check.
"""

from __future__ import annotations

import random

from sagellm.core import Request, SchedulerOutput, StepResult
from sagellm.core.scheduler import Scheduler


class ShadowKV:
    """Token ids per device block slot and per lower-tier slot, moved as the ops say."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.hbm: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.tiers: dict[str, dict[int, list[int | None]]] = {"ddr": {}, "nvme": {}}
        self.tables: dict[str, list[int]] = {}

    def read(self, tier: str, index: int) -> list[int | None]:
        if tier == "hbm":
            return list(self.hbm[index])
        assert index in self.tiers[tier], f"read of empty {tier} slot {index}"
        return list(self.tiers[tier][index])

    def step(self, out: SchedulerOutput, requests: dict[str, Request], check_all: bool = False) -> None:
        for op in out.kv_ops:
            if op.kind == "drop":
                self.tiers[op.src_tier].pop(op.src_index, None)
                continue
            data = self.read(op.src_tier, op.src_index)
            if op.src_tier != "hbm":
                del self.tiers[op.src_tier][op.src_index]
            if op.dst_tier == "hbm":
                self.hbm[op.dst_index] = data
            else:
                self.tiers[op.dst_tier][op.dst_index] = data
        for rid in out.finished_ids + out.preempted_ids:
            self.tables.pop(rid, None)
        bs = self.block_size
        for s in out.scheduled:
            if s.resets_block_table:
                self.tables[s.request_id] = list(s.new_block_ids)
            else:
                self.tables[s.request_id].extend(s.new_block_ids)
            table = self.tables[s.request_id]
            req = requests[s.request_id]
            positions = range(s.start_position) if (s.resets_block_table or check_all) else (
                range(s.start_position - 1, s.start_position) if s.start_position else ())
            for p in positions:
                got = self.hbm[table[p // bs]][p % bs]
                assert got == req.token_id_at(p), (
                    f"step {out.step_id}: {s.request_id} position {p} reads token {got}, "
                    f"expected {req.token_id_at(p)}")
            for j, tok in enumerate(s.token_ids):
                p = s.start_position + j
                assert tok == req.token_id_at(p)
                self.hbm[table[p // bs]][p % bs] = tok


def run_step(sched: Scheduler, shadow: ShadowKV, now: float, rng: random.Random, vocab: int = 50,
             check_all: bool = False) -> tuple[SchedulerOutput, list[Request]]:
    """One schedule / shadow-execute / update round with random sampled tokens."""
    out = sched.schedule(now)
    shadow.step(out, sched.requests, check_all)
    sampled = {rid: rng.randrange(1, vocab) for rid, s in zip(out.request_ids, out.samples) if s}
    finished = sched.update(out, StepResult(out.step_id, sampled), now + 0.01)
    sched.kv.check_invariants()
    return out, finished
