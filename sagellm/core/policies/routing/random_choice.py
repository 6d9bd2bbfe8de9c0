"""Uniformly random, from a seeded generator (Vidur's random global scheduler)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from sagellm.core.policies.routing.base import ReplicaLoad, Router, RouteRequest
from sagellm.core.policies.routing.registry import ROUTERS


@ROUTERS.register("random")
class RandomRouter(Router):
    """A live replica drawn uniformly by `random.Random(seed)`: the same seed and the same
    sequence of calls give the same picks. Side effect: advances its generator."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def route(self, request: RouteRequest, replicas: Sequence[ReplicaLoad], now: float) -> int:
        return replicas[self._rng.randrange(len(replicas))].index
