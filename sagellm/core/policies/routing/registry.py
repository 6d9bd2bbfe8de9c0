"""The registry of routers (standard library only)."""

from sagellm.core.policies.registry import Registry

ROUTERS = Registry("routing", required=("route",))
