"""Routers: which replica gets a new request (standard library only).

A router sees only counts the caller passes in, so the same object routes in the simulator and in
a live multi-replica deployment.
"""

from __future__ import annotations

ROUTER_KINDS = ("round_robin", "least_outstanding")


class RoundRobinRouter:
    """Sends the i-th request to replica i mod n. Side effect: advances its cursor on every `route`."""

    def __init__(self, num_replicas: int) -> None:
        if num_replicas <= 0:
            raise ValueError(f"num_replicas must be > 0, got {num_replicas}")
        self.num_replicas = num_replicas
        self._next = 0

    def route(self, outstanding: list[int]) -> int:
        i = self._next
        self._next = (i + 1) % self.num_replicas
        return i


class LeastOutstandingRouter:
    """Sends a request to the replica with the fewest unfinished requests (lowest index on ties)."""

    def __init__(self, num_replicas: int) -> None:
        if num_replicas <= 0:
            raise ValueError(f"num_replicas must be > 0, got {num_replicas}")
        self.num_replicas = num_replicas

    def route(self, outstanding: list[int]) -> int:
        return min(range(self.num_replicas), key=outstanding.__getitem__)


def make_router(kind: str, num_replicas: int) -> RoundRobinRouter | LeastOutstandingRouter:
    if kind == "round_robin":
        return RoundRobinRouter(num_replicas)
    if kind == "least_outstanding":
        return LeastOutstandingRouter(num_replicas)
    raise ValueError(f"router must be one of {ROUTER_KINDS}, got {kind!r}")
