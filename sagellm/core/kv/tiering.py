"""Where cached KV blocks live and when they move: the tiering policy (standard library only)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

from sagellm.core.kv.block_pool import BlockPool
from sagellm.core.kv.stats import KVStats
from sagellm.core.kv.tier_pool import TierPool
from sagellm.core.kv.tiers import DROP, OFFLOAD, PROMOTE, KVOp, KVPolicy, StorageTier
from sagellm.core.policies.eviction import make_eviction_policy
from sagellm.core.policies.registry import PolicyError

HBM = StorageTier.HBM.value
DDR = StorageTier.DDR.value
NVME = StorageTier.NVME.value


class TierPolicy:
    """Moves cached blocks between the device pool and the lower tiers, and queues the copies.

    Contract: a block evicted from the device pool (`on_device_evict`, wired to the pool) moves one
    tier down: DDR, then NVMe, then it is dropped; a full tier first pushes its own victim down.
    Victims, on the device and in every lower tier, are the eviction policy's choice
    (`policy.eviction_policy`); an answer that is not a candidate raises `PolicyError`.
    `step_begin(now)` moves blocks idle for the cold timeout down a tier (hot blocks stay) and
    promotes hot NVMe blocks into free DDR slots. Every move is queued in `ops`, in the order it
    must run, and counted in `stats`. `access` counts prefix hits per content hash.
    """

    def __init__(self, policy: KVPolicy, pool: BlockPool, block_size: int) -> None:
        self.policy = policy
        self.pool = pool
        self.stats = KVStats(block_size)
        self.ddr = TierPool(DDR, policy.ddr_blocks) if policy.ddr_blocks else None
        self.nvme = TierPool(NVME, policy.nvme_blocks) if policy.nvme_blocks else None
        self.lower: list[TierPool] = [t for t in (self.ddr, self.nvme) if t is not None]
        self.ops: list[KVOp] = []
        self.access: dict[int, int] = {}
        self.now = 0.0
        pool.on_evict = self.on_device_evict
        self.eviction = make_eviction_policy(policy.eviction_policy, policy.eviction_policy_args)
        self.evicts_oldest = bool(getattr(self.eviction, "evicts_oldest", False))
        if not self.evicts_oldest:  # else the pool takes its oldest block itself
            pool.choose_victim = self._device_victim

    def take_ops(self) -> tuple[KVOp, ...]:
        if not self.ops:
            return ()
        ops, self.ops = tuple(self.ops), []
        return ops

    def is_hot(self, h: int) -> bool:
        return self.access.get(h, 0) >= self.policy.hot_access_threshold

    def step_begin(self, now: float) -> None:
        """Time-driven tiering, once per step: cold cached blocks move down a tier, hot NVMe blocks
        move up to free DDR space."""
        self.now = now
        policy = self.policy
        if not self.lower or not policy.enable_prefix_caching:
            return
        timeout = policy.cold_timeout_s
        if timeout is not None:
            self._demote_cold_device(now - timeout, now)
            if self.ddr is not None and self.nvme is not None:
                self._demote_cold_tier(self.ddr, now - timeout, now)
        nvme, ddr = self.nvme, self.ddr
        if nvme is not None and ddr is not None and nvme.hot:
            for _ in range(min(policy.max_promotions_per_step, ddr.num_free, len(nvme.hot))):
                key = next(iter(nvme.hot))
                src = nvme.take(key)
                dst = ddr.store(key, now, hot=True)
                self.copy(PROMOTE, NVME, src, DDR, dst)

    def _demote_cold_device(self, limit: float, now: float) -> None:
        pool, hot = self.pool, self.policy.hot_access_threshold
        evictable = pool.evictable
        while evictable:
            b, released = next(iter(evictable.items()))
            if released > limit:
                return
            h = pool.block_hash[b]
            if self.access.get(h, 0) >= hot:
                # A hot block stays on the device; its idle clock restarts.
                evictable.move_to_end(b)
                evictable[b] = now
                continue
            pool.drop_evictable(b)
            self.stats.cold_offloads += 1
            self.stats.evictions[HBM] += 1
            self.demote(0, h, HBM, b)

    def _demote_cold_tier(self, tier: TierPool, limit: float, now: float) -> None:
        level = self.lower.index(tier)
        while tier.lru:
            key, stored = next(iter(tier.lru.items()))
            if stored > limit:
                return
            if key in tier.hot:
                tier.lru.move_to_end(key)
                tier.lru[key] = now
                continue
            slot = tier.take(key)
            self.stats.cold_offloads += 1
            self.stats.evictions[tier.tier] += 1
            self.demote(level + 1, key, tier.tier, slot)

    def on_device_evict(self, block: int, h: int) -> None:
        self.stats.evictions[HBM] += 1
        self.demote(0, h, HBM, block)

    def demote(self, level: int, h: int, src_tier: str, src_index: int) -> None:
        """Content `h`, now at (src_tier, src_index), moves to lower tier `level` (making room there
        by demoting that tier's victim first), or is dropped when there is no such tier."""
        if level >= len(self.lower):
            self._drop(h, src_tier, src_index)
            return
        tier = self.lower[level]
        if not self.make_room(tier, 1, self.now):
            self._drop(h, src_tier, src_index)
            return
        hot = self.access.get(h, 0) >= self.policy.hot_access_threshold
        slot = tier.store(h, self.now, hot=hot)
        self.copy(OFFLOAD, src_tier, src_index, tier.tier, slot)

    def make_room(self, tier: TierPool, n: int, now: float) -> bool:
        """Demote victims of `tier` until it has `n` free slots; False if pinned entries prevent it."""
        if tier.num_free >= n:
            return True
        if tier.num_slots - len(tier.slots) + len(tier.lru) < n:
            return False
        level = self.lower.index(tier)
        while tier.num_free < n:
            key = self._tier_victim(tier)
            slot = tier.take(key)
            self.stats.evictions[tier.tier] += 1
            self.demote(level + 1, key, tier.tier, slot)
        return True

    def _drop(self, h: int, tier: str, index: int) -> None:
        self.access.pop(h, None)
        self.stats.drops[tier] += 1
        if tier != HBM:
            self.ops.append(KVOp(DROP, tier, index))

    def copy(self, kind: str, src: str, src_index: int, dst: str, dst_index: int,
              request_id: str | None = None) -> None:
        self.ops.append(KVOp(kind, src, src_index, dst, dst_index, request_id))
        self.stats.copies[f"{kind}:{src}->{dst}"] += 1

    def tier(self, name: str) -> TierPool:
        return self.ddr if name == DDR else self.nvme

    def _tier_victim(self, tier: TierPool) -> Hashable:
        if self.evicts_oldest:
            return next(iter(tier.lru))
        access = self.access
        return self._ask_victim(tier.lru, lambda k: access.get(k, 0), tier.tier)

    def _device_victim(self) -> int:
        access, block_hash = self.access, self.pool.block_hash
        return self._ask_victim(self.pool.evictable, lambda b: access.get(block_hash[b], 0), HBM)

    def _ask_victim(self, candidates: Mapping[Hashable, float], hits: Callable[[Hashable], int],
                    tier: str) -> Hashable:
        victim = self.eviction.victim(candidates, hits, self.now)
        if victim not in candidates:
            raise PolicyError(f"kv_cache.eviction_policy: {type(self.eviction).__name__}.victim returned "
                              f"{victim!r}, which is not an evictable entry of tier {tier}")
        return victim
