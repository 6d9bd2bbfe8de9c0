"""Paged KV-cache management: block pool, block tables, prefix reuse and tiering decisions."""

from sagellm.core.kv.block_pool import BlockPool
from sagellm.core.kv.manager import KVCacheManager, blocks_for_tokens
from sagellm.core.kv.stats import KVStats
from sagellm.core.kv.tier_pool import TierPool
from sagellm.core.kv.tiers import KVGranularity, KVOp, KVPolicy, StorageTier

__all__ = ["BlockPool", "KVCacheManager", "KVGranularity", "KVOp", "KVPolicy", "KVStats", "StorageTier",
           "TierPool", "blocks_for_tokens"]
