"""Paged KV-cache management: block pool and per-request block tables."""

from sagellm.core.kv.block_pool import BlockPool
from sagellm.core.kv.manager import KVCacheManager, blocks_for_tokens

__all__ = ["BlockPool", "KVCacheManager", "blocks_for_tokens"]
