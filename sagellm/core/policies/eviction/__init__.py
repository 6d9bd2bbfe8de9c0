"""KV eviction policies, one file each, registered in `EVICTION_POLICIES` (standard library only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sagellm.core.policies.eviction import lfu, lru  # noqa: F401  (they register)
from sagellm.core.policies.eviction.base import EvictionPolicy
from sagellm.core.policies.eviction.registry import EVICTION_POLICIES


def make_eviction_policy(spec: Any = "lru", args: Mapping[str, Any] | None = None,
                         field: str = "kv_cache.eviction_policy") -> Any:
    """A new eviction policy: a registered name or 'package.module:Class', built with keyword
    `args`. `PolicyError` naming `field` when it cannot be found, imported or built."""
    return EVICTION_POLICIES.create(spec, field, args)


__all__ = ["EVICTION_POLICIES", "EvictionPolicy", "make_eviction_policy"]
