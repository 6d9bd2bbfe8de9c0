"""The registry of scheduling policies (standard library only)."""

from sagellm.core.policies.registry import Registry

SCHEDULING_POLICIES = Registry("scheduling", required=("order", "victim"))
