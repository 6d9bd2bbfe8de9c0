"""A router of one's own: each tenant has a home replica, so a tenant's prompts (and their cached
prefixes) stay together, unless the home is overloaded.

Run it from the repository root with `cluster.router: examples.policies.tenant_home:TenantHome`
and, optionally, `cluster.router_args: {spill_at: 8}`.
"""

from __future__ import annotations

from collections.abc import Sequence

from sagellm.core.policies.routing import ReplicaLoad, Router, RouteRequest


class TenantHome(Router):
    """Tenants get home replicas in turn as they first appear (the first tenant the first live
    replica, the next the second, ...). A request goes home unless home is dead or holds `spill_at` or more
    outstanding requests than the least loaded replica; then the least loaded replica takes it."""

    def __init__(self, spill_at: int = 4) -> None:
        if not isinstance(spill_at, int) or spill_at < 1:
            raise ValueError(f"spill_at must be an int >= 1, got {spill_at!r}")
        self.spill_at = spill_at
        self.homes: dict[str, int] = {}

    def route(self, request: RouteRequest, replicas: Sequence[ReplicaLoad], now: float) -> int:
        least = min(replicas, key=lambda r: r.outstanding)
        if request.tenant not in self.homes:
            self.homes[request.tenant] = replicas[len(self.homes) % len(replicas)].index
        home = next((r for r in replicas if r.index == self.homes[request.tenant]), None)
        if home is None or home.outstanding - least.outstanding >= self.spill_at:
            return least.index
        return home.index
