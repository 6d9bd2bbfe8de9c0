"""Cache-aware routing: send a request where its prefix is cached, unless that replica is overloaded
(the policy of SGLang's cache-aware router, "SGLang: Efficient Execution of Structured Language
Model Programs", 2024, and Preble, ICLR'25)."""

from __future__ import annotations

from collections.abc import Sequence

from sagellm.core.policies.routing.base import ReplicaLoad, Router, RouteRequest, least_loaded
from sagellm.core.policies.routing.registry import ROUTERS


@ROUTERS.register("prefix_affinity")
class PrefixAffinityRouter(Router):
    """The replica with the most of the request's leading blocks cached wins (fewest outstanding,
    then lowest index, among equals), unless it has more than `max_load_ratio` times the
    outstanding requests of the least loaded replica plus `load_slack`; then, or when no replica
    has any of the prefix, the least loaded replica takes it. No state of its own: the cluster's
    prefix index supplies `cached_blocks`."""

    uses_replica_state = True

    def __init__(self, max_load_ratio: float = 2.0, load_slack: int = 2) -> None:
        if not max_load_ratio >= 1.0:
            raise ValueError(f"max_load_ratio must be >= 1, got {max_load_ratio!r}")
        if not isinstance(load_slack, int) or load_slack < 0:
            raise ValueError(f"load_slack must be an int >= 0, got {load_slack!r}")
        self.max_load_ratio = max_load_ratio
        self.load_slack = load_slack

    def route(self, request: RouteRequest, replicas: Sequence[ReplicaLoad], now: float) -> int:
        least = least_loaded(replicas)
        best = min(replicas, key=lambda r: (-r.cached_blocks, r.outstanding, r.index))
        if best.cached_blocks == 0:
            return least.index
        if best.outstanding > self.max_load_ratio * least.outstanding + self.load_slack:
            return least.index
        return best.index
