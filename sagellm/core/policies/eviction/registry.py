"""The registry of KV eviction policies (standard library only)."""

from sagellm.core.policies.registry import Registry

EVICTION_POLICIES = Registry("eviction", required=("victim",))
