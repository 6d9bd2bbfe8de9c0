"""Counters of the KV runtime's decisions: prefix hits, copies between tiers, evictions (stdlib only)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class KVStats:
    """Mutable counters, owned by one `KVCacheManager`; `to_dict` gives a flat, JSON-ready snapshot.

    Prefix lookups count every admission that looked for cached blocks: `query_blocks` is the
    number of full prompt blocks it could have reused, `hit_blocks[tier]` how many it found in
    each tier. `copies["offload:hbm->ddr"]` etc. count block copies by kind and direction;
    `evictions[tier]` cached blocks pushed out of a tier for room or by the cold timeout;
    `drops[tier]` cached content discarded for good.
    """

    block_size: int
    lookups: int = 0
    query_blocks: int = 0
    hit_blocks: Counter = field(default_factory=Counter)
    copies: Counter = field(default_factory=Counter)
    evictions: Counter = field(default_factory=Counter)
    drops: Counter = field(default_factory=Counter)
    cold_offloads: int = 0
    swaps_out: int = 0
    swaps_in: int = 0
    swap_fallbacks: int = 0
    load_failures: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of queried prompt blocks (equally, tokens) served from any tier."""
        return sum(self.hit_blocks.values()) / self.query_blocks if self.query_blocks else 0.0

    def to_dict(self) -> dict[str, float | int]:
        bs = self.block_size
        hits = sum(self.hit_blocks.values())
        d: dict[str, float | int] = {
            "prefix_lookups": self.lookups,
            "query_blocks": self.query_blocks,
            "query_tokens": self.query_blocks * bs,
            "hit_blocks": hits,
            "hit_tokens": hits * bs,
            "hit_rate": round(self.hit_rate, 6),
            "cold_offloads": self.cold_offloads,
            "swaps_out": self.swaps_out,
            "swaps_in": self.swaps_in,
            "swap_fallbacks": self.swap_fallbacks,
            "load_failures": self.load_failures,
        }
        for tier in ("hbm", "ddr", "nvme"):
            d[f"hit_blocks_{tier}"] = self.hit_blocks[tier]
            d[f"hit_tokens_{tier}"] = self.hit_blocks[tier] * bs
            d[f"evictions_{tier}"] = self.evictions[tier]
            d[f"drops_{tier}"] = self.drops[tier]
        for key in COPY_KINDS:
            d[key.replace(":", "_").replace("->", "_to_")] = self.copies[key]
        return d


COPY_KINDS = ("offload:hbm->ddr", "offload:hbm->nvme", "offload:ddr->nvme", "load:ddr->hbm", "load:nvme->hbm",
              "promote:nvme->ddr")
