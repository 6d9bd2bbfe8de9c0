"""One lower KV tier (DDR or NVMe) as the policy layer sees it: slots and what they hold (stdlib only)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable


class TierPool:
    """`num_slots` block-sized slots of one tier.

    Contract: `store(key, now)` puts an entry in a free slot and returns the slot. Entries are
    cached blocks (keyed by content hash, evictable, tracked oldest first by when they were
    stored) or pinned entries (a swapped-out request's blocks, or a cached block a pending load
    reads), which are never victims. `take(key)` removes an entry and frees its slot at once (an
    operation later in the same step may reuse it).
    """

    def __init__(self, tier: str, num_slots: int) -> None:
        self.tier = tier
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))
        self.slots: dict[Hashable, int] = {}
        self.lru: OrderedDict[Hashable, float] = OrderedDict()  # evictable entries -> stored at
        self.hot: OrderedDict[Hashable, None] = OrderedDict()  # evictable entries that are hot

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.slots

    def store(self, key: Hashable, now: float, *, evictable: bool = True, hot: bool = False) -> int:
        """Put `key` in a free slot and return the slot. Precondition: a slot is free and `key` is
        not stored (callers make room first); ValueError otherwise."""
        if not self._free or key in self.slots:
            raise ValueError(f"{self.tier}: cannot store {key!r} (full, or already stored)")
        slot = self._free.popleft()
        self.slots[key] = slot
        if evictable:
            self.lru[key] = now
            if hot:
                self.hot[key] = None
        return slot

    def pin(self, key: Hashable) -> None:
        """Make an entry safe from eviction (it is about to be read)."""
        self.lru.pop(key, None)
        self.hot.pop(key, None)

    def take(self, key: Hashable) -> int:
        slot = self.slots.pop(key)
        self.lru.pop(key, None)
        self.hot.pop(key, None)
        self._free.append(slot)
        return slot

    def check_invariants(self) -> None:
        used = list(self.slots.values())
        if len(set(used)) != len(used):
            raise AssertionError(f"{self.tier}: a slot holds two entries")
        if set(used) & set(self._free) or len(used) + len(self._free) != self.num_slots:
            raise AssertionError(f"{self.tier}: {len(used)} used + {len(self._free)} free != {self.num_slots} slots")
        if not set(self.lru) <= set(self.slots) or not set(self.hot) <= set(self.lru):
            raise AssertionError(f"{self.tier}: an evictable entry holds no slot")
