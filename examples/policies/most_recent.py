"""A KV eviction policy of one's own: most recently used first, the classic answer to a cyclic
scan larger than the cache (where LRU evicts every block just before it is needed again).

Run it with `kv_cache.eviction_policy: examples.policies.most_recent:MostRecentlyUsed`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

from sagellm.core.policies.eviction import EvictionPolicy


class MostRecentlyUsed(EvictionPolicy):
    """Evicts the entry that became evictable last, unless it was hit at least `protect_hits`
    times; then the newest unprotected one, and the oldest when every candidate is protected."""

    def __init__(self, protect_hits: int = 3) -> None:
        if not isinstance(protect_hits, int) or protect_hits < 1:
            raise ValueError(f"protect_hits must be an int >= 1, got {protect_hits!r}")
        self.protect_hits = protect_hits

    def victim(self, candidates: Mapping[Hashable, float], hits: Callable[[Hashable], int], now: float) -> Hashable:
        for key in reversed(candidates):
            if hits(key) < self.protect_hits:
                return key
        return next(iter(candidates))
