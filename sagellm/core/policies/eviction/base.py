"""The contract of a KV eviction policy (standard library only)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping


class EvictionPolicy(ABC):
    """Picks which cached, unreferenced KV block leaves a full tier. A policy: it decides, the KV
    runtime acts (moves the block down a tier or drops it).

    Contract: `victim(candidates, hits, now)` returns one key of `candidates`, a non-empty mapping
    of the evictable entries of one tier (device block ids, or content hashes in DDR and NVMe) to
    the time each became evictable, oldest first; `hits(key)` is how often the entry's content was
    found by a prefix lookup (the runtime's counter, which a drop resets). It is called for the
    device pool and for each lower tier, and must not change its arguments. A policy whose answer is always the
    oldest entry sets `evicts_oldest = True`, and the runtime then skips the call.
    """

    name = ""  # set by the registry
    evicts_oldest = False

    @abstractmethod
    def victim(self, candidates: Mapping[Hashable, float], hits: Callable[[Hashable], int], now: float) -> Hashable:
        """The entry to evict."""
