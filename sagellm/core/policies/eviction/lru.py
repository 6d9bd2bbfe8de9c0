"""Least recently used: the entry evictable the longest goes first."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

from sagellm.core.policies.eviction.base import EvictionPolicy
from sagellm.core.policies.eviction.registry import EVICTION_POLICIES


@EVICTION_POLICIES.register("lru")
class LeastRecentlyUsed(EvictionPolicy):
    """The oldest candidate: released (device) or stored (DDR, NVMe) the longest ago. No state."""

    evicts_oldest = True

    def victim(self, candidates: Mapping[Hashable, float], hits: Callable[[Hashable], int], now: float) -> Hashable:
        return next(iter(candidates))
