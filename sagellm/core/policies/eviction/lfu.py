"""Least frequently used: the entry with the fewest prefix hits goes first."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

from sagellm.core.policies.eviction.base import EvictionPolicy
from sagellm.core.policies.eviction.registry import EVICTION_POLICIES


@EVICTION_POLICIES.register("lfu")
class LeastFrequentlyUsed(EvictionPolicy):
    """The candidate with the fewest prefix hits, the oldest among equals. No state (the runtime
    counts the hits). Scans every candidate: O(candidates) per eviction."""

    def victim(self, candidates: Mapping[Hashable, float], hits: Callable[[Hashable], int], now: float) -> Hashable:
        return min(candidates, key=hits)
