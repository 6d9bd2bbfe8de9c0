"""Power of two choices (Mitzenmacher, 2001; SGLang's power_of_two router)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from sagellm.core.policies.routing.base import ReplicaLoad, Router, RouteRequest
from sagellm.core.policies.routing.registry import ROUTERS


@ROUTERS.register("power_of_two")
class PowerOfTwoRouter(Router):
    """Two distinct live replicas drawn by `random.Random(seed)`; the one with fewer outstanding
    requests wins (the first drawn on a tie). Side effect: advances its generator."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def route(self, request: RouteRequest, replicas: Sequence[ReplicaLoad], now: float) -> int:
        if len(replicas) == 1:
            return replicas[0].index
        first, second = self._rng.sample(range(len(replicas)), 2)
        a, b = replicas[first], replicas[second]
        return b.index if b.outstanding < a.outstanding else a.index
