"""Round robin: each live replica in turn."""

from __future__ import annotations

from collections.abc import Sequence

from sagellm.core.policies.routing.base import ReplicaLoad, Router, RouteRequest
from sagellm.core.policies.routing.registry import ROUTERS


@ROUTERS.register("round_robin")
class RoundRobinRouter(Router):
    """The i-th request goes to the (i mod n)-th live replica. Side effect: advances a cursor."""

    def __init__(self) -> None:
        self._next = 0

    def route(self, request: RouteRequest, replicas: Sequence[ReplicaLoad], now: float) -> int:
        pick = replicas[self._next % len(replicas)]
        self._next = (self._next + 1) % len(replicas)
        return pick.index
