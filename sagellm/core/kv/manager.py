"""Paged KV-cache bookkeeping: block tables, prefix reuse and tiering decisions (standard library only)."""

from __future__ import annotations

from collections.abc import Sequence

from sagellm.core.kv.block_pool import BlockPool
from sagellm.core.kv.stats import KVStats
from sagellm.core.kv.tiering import TierPolicy
from sagellm.core.kv.tiers import DROP, LOAD, OFFLOAD, KVOp, KVPolicy, StorageTier

HBM = StorageTier.HBM.value
DDR = StorageTier.DDR.value
NVME = StorageTier.NVME.value

Hit = tuple[str, int]  # (tier, block or slot index)


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    """Owns the device block pool, every request's block table and the lower tiers' contents.

    Contract: `allocate_slots(request_id, num_tokens)` makes the request's table large enough to
    hold `num_tokens` tokens and returns the block ids it added (possibly none), or `None` when the
    pool cannot supply them, in which case nothing changes. `free(request_id, now)` releases all of
    the request's blocks. Block ids are real indices into the executor's KV tensors.

    With prefix caching (`KVPolicy`), full blocks are registered under chained content hashes once
    computed (`cache_computed`); `lookup` finds the longest cached prefix across tiers and
    `admit` takes it (sharing device blocks, loading lower-tier ones). Blocks evicted from the
    device move down the tiers (DDR, then NVMe, then gone) and every copy this implies is queued
    as a `KVOp`; `take_ops` hands the queue to the scheduler, which puts it in the step's output.
    Each cached content lives in exactly one tier.
    """

    def __init__(self, num_blocks: int, block_size: int, policy: KVPolicy | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self.policy = policy or KVPolicy()
        self.caching = self.policy.enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}
        self.tiers = TierPolicy(self.policy, self.pool, block_size)
        self.ddr, self.nvme, self.lower = self.tiers.ddr, self.tiers.nvme, self.tiers.lower
        self._num_registered: dict[str, int] = {}
        self._swapped: dict[str, tuple[list[int], int]] = {}  # request -> (DDR slots, tokens)

    @property
    def stats(self) -> KVStats:
        return self.tiers.stats

    def step_begin(self, now: float) -> None:
        """Time-driven tiering, once per step (see `TierPolicy.step_begin`)."""
        self.tiers.step_begin(now)

    # ---- capacity ---------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    @property
    def usage(self) -> float:
        """Fraction of device blocks owned by requests (cached unreferenced blocks count as free)."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return list(self._tables.get(request_id, ()))

    def num_slots(self, request_id: str) -> int:
        """Tokens the request's current blocks can hold."""
        return len(self._tables.get(request_id, ())) * self.block_size

    def num_new_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        have = len(self._tables.get(request_id, ()))
        return max(0, blocks_for_tokens(num_tokens, self.block_size) - have)

    # ---- plain allocation ---------------------------------------------------------------------
    def allocate_slots(self, request_id: str, num_tokens: int) -> list[int] | None:
        need = self.num_new_blocks_needed(request_id, num_tokens)
        new_blocks = self.pool.allocate(need)
        if new_blocks is None:
            return None
        self._tables.setdefault(request_id, []).extend(new_blocks)
        return new_blocks

    def append_blocks(self, request_ids: list[str]) -> list[int] | None:
        """One more block at the end of each request's existing table, handed out in the order of
        `request_ids` (as `allocate_slots` one at a time would); all or nothing: the blocks, or None
        (nothing changes) when fewer are available."""
        blocks = self.pool.allocate(len(request_ids))
        if blocks is not None:
            tables = self._tables
            for rid, block in zip(request_ids, blocks):
                tables[rid].append(block)
        return blocks

    def free(self, request_id: str, now: float = 0.0) -> None:
        """Release the request's device blocks (cached ones stay findable) and any swapped copy."""
        self._num_registered.pop(request_id, None)
        table = self._tables.pop(request_id, None)
        if table:
            # Release in reverse so a request's tail blocks are evicted (or reused) first.
            self.pool.release(table[::-1], now)
        swapped = self._swapped.pop(request_id, None)
        if swapped is not None:
            for i in range(len(swapped[0])):
                self.tiers.ops.append(KVOp(DROP, DDR, self.ddr.take(("swap", request_id, i))))

    def take_ops(self) -> tuple[KVOp, ...]:
        """The KV operations decided since the last call, in execution order."""
        return self.tiers.take_ops()

    # ---- prefix reuse -------------------------------------------------------------------------
    def lookup(self, hashes: Sequence[int]) -> list[Hit]:
        """The longest prefix of `hashes` cached in some tier, as (tier, index) per block. No side effects."""
        hits: list[Hit] = []
        cached = self.pool.cached
        lower = self.lower
        for h in hashes:
            b = cached.get(h)
            if b is not None:
                hits.append((HBM, b))
                continue
            for tier in lower:
                slot = tier.slots.get(h)
                if slot is not None:
                    hits.append((tier.tier, slot))
                    break
            else:
                break
        return hits

    def admit(self, request_id: str, hashes: Sequence[int], hits: Sequence[Hit], num_tokens: int,
              query_blocks: int, now: float) -> tuple[int, ...] | None:
        """Start the request's table: its `hits` (from `lookup`, first `len(hits)` of `hashes`)
        followed by fresh blocks up to `num_tokens` tokens. Lower-tier hits are copied into new
        device blocks (queued loads). Returns the table, or None when the pool cannot hold it
        (nothing changes). `query_blocks` is what the lookup could have hit, for the hit rate."""
        pool = self.pool
        need = blocks_for_tokens(num_tokens, self.block_size) - len(hits)
        lower_hits = [i for i, (tier, _) in enumerate(hits) if tier != HBM]
        revived = sum(1 for tier, b in hits if tier == HBM and pool.ref_count(b) == 0)
        if need + len(lower_hits) > pool.num_free - revived:
            return None
        self.tiers.now = now
        stats = self.stats
        stats.lookups += 1
        stats.query_blocks += query_blocks
        access = self.tiers.access
        table = [-1] * len(hits)
        for i, (tier, b) in enumerate(hits):
            h = hashes[i]
            access[h] = access.get(h, 0) + 1
            stats.hit_blocks[tier] += 1
            if tier == HBM:
                pool.retain(b)
                table[i] = b
            else:
                self.tiers.tier(tier).pin(h)
        fresh = pool.allocate(need + len(lower_hits))
        for i in lower_hits:
            tier = self.tiers.tier(hits[i][0])
            dst = fresh.pop()
            self.tiers.copy(LOAD, tier.tier, tier.take(hashes[i]), HBM, dst, request_id)
            pool.register(dst, hashes[i])
            table[i] = dst
        table.extend(fresh)
        self._tables[request_id] = table
        self._num_registered[request_id] = len(hits)
        return tuple(table)

    def cache_computed(self, request_id: str, hashes: Sequence[int], num_computed_tokens: int) -> None:
        """Register the request's blocks that are full and computed (the first
        `num_computed_tokens // block_size`, whose hashes are `hashes`) as reusable content."""
        done = self._num_registered.get(request_id, 0)
        n_full = min(num_computed_tokens // self.block_size, len(hashes))
        if n_full <= done:
            return
        table = self._tables[request_id]
        pool, lower = self.pool, self.lower
        for i in range(done, n_full):
            h = hashes[i]
            if h not in pool.cached and not any(h in t.slots for t in lower):
                pool.register(table[i], h)
        self._num_registered[request_id] = n_full

    def invalidate(self, blocks: Sequence[int]) -> None:
        """Forget the content of device blocks whose copy failed (they are never served)."""
        for b in blocks:
            h = self.pool.block_hash.get(b)
            if h is not None:
                self.tiers.access.pop(h, None)
            self.pool.uncache(b)
        self.stats.load_failures += len(blocks)

    def reset_cache(self) -> bool:
        """Forget every cached block in every tier and zero the stats (between experiment runs).
        Only when no request holds blocks or swapped copies; returns False (nothing changes) otherwise."""
        if self._tables or self._swapped:
            return False
        for b in list(self.pool.block_hash):
            self.pool.uncache(b)
        for tier in self.lower:
            for key in list(tier.slots):
                self.tiers.ops.append(KVOp(DROP, tier.tier, tier.take(key)))
        self.tiers.access.clear()
        self.tiers.stats = KVStats(self.block_size)
        return True

    # ---- request granularity: swap a preempted request out and back -----------------------------
    def is_swapped(self, request_id: str) -> bool:
        return request_id in self._swapped

    def swap_out(self, request_id: str, num_tokens: int, now: float) -> bool:
        """Copy the blocks holding the request's first `num_tokens` tokens to DDR and free its device
        blocks; False (nothing copied, blocks still held) if DDR cannot make room."""
        ddr = self.ddr
        n = blocks_for_tokens(num_tokens, self.block_size)
        if ddr is None or n == 0:
            return False
        if not self.tiers.make_room(ddr, n, now):
            self.stats.swap_fallbacks += 1
            return False
        table = self._tables[request_id]
        slots = []
        for i in range(n):
            slot = ddr.store(("swap", request_id, i), now, evictable=False)
            self.tiers.copy(OFFLOAD, HBM, table[i], DDR, slot, request_id)
            slots.append(slot)
        self.stats.swaps_out += 1
        self.free(request_id, now)
        self._swapped[request_id] = (slots, num_tokens)
        return True

    def swap_in(self, request_id: str, num_tokens: int, now: float) -> tuple[int, ...] | None:
        """A fresh table for a swapped-out request: its DDR blocks copied back (queued loads), then
        new blocks up to `num_tokens` tokens; None when the pool cannot hold it (nothing changes)."""
        slots, _ = self._swapped[request_id]
        need = max(blocks_for_tokens(num_tokens, self.block_size), len(slots))
        table = self.pool.allocate(need)
        if table is None:
            return None
        self.tiers.now = now
        del self._swapped[request_id]
        for i, dst in enumerate(table[: len(slots)]):
            self.ddr.take(("swap", request_id, i))
            self.tiers.copy(LOAD, DDR, slots[i], HBM, dst, request_id)
        self.stats.swaps_in += 1
        self._tables[request_id] = table
        self._num_registered[request_id] = 0
        return tuple(table)

    # ---- checks ---------------------------------------------------------------------------------
    def owners(self) -> dict[str, list[int]]:
        """A copy of every request's block table (for checks and logging)."""
        return {rid: list(t) for rid, t in self._tables.items()}

    def check_invariants(self) -> None:
        """Raise AssertionError unless each device block is free or owned with exact reference
        counts, and every tier's slots are accounted for exactly."""
        owned: dict[int, int] = {}
        for table in self._tables.values():
            for b in table:
                owned[b] = owned.get(b, 0) + 1
        pool = self.pool
        pool.check_invariants()
        free = pool.free_block_ids()
        for b in range(pool.num_blocks):
            refs = pool.ref_count(b)
            if b in free:
                if b in owned:
                    raise AssertionError(f"block {b} is free yet owned {owned[b]} times")
            elif refs != owned.get(b, 0) or refs == 0:
                raise AssertionError(f"block {b}: ref count {refs} but owned {owned.get(b, 0)} times")
        for tier in self.lower:
            tier.check_invariants()
        contents = [set(pool.cached)] + [{k for k in t.slots if not isinstance(k, tuple)} for t in self.lower]
        for i, a in enumerate(contents):
            for b in contents[i + 1:]:
                if a & b:
                    raise AssertionError("a cached block lives in two tiers")
        swapped = sum(len(s) for s, _ in self._swapped.values())
        pinned = sum(1 for t in self.lower for k in t.slots if isinstance(k, tuple))
        if swapped != pinned:
            raise AssertionError(f"{swapped} swapped blocks but {pinned} swap slots held")
