"""Least outstanding requests (Vidur's LOR, SGLang's shortest queue)."""

from __future__ import annotations

from collections.abc import Sequence

from sagellm.core.policies.routing.base import ReplicaLoad, Router, RouteRequest, least_loaded
from sagellm.core.policies.routing.registry import ROUTERS


@ROUTERS.register("least_outstanding")
class LeastOutstandingRouter(Router):
    """The replica with the fewest unfinished requests (lowest index on ties). No state."""

    def route(self, request: RouteRequest, replicas: Sequence[ReplicaLoad], now: float) -> int:
        return least_loaded(replicas).index
