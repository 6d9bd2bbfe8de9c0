"""Cache-aware routing: send a request where its prefix is cached unless the cluster is out of
balance (the rule of SGLang's cache-aware router, "SGLang: Efficient Execution of Structured
Language Model Programs", NeurIPS'24, with its defaults; Preble, ICLR'25, studies the same trade)."""

from __future__ import annotations

from collections.abc import Sequence

from sagellm.core.policies.routing.base import ReplicaLoad, Router, RouteRequest, least_loaded
from sagellm.core.policies.routing.registry import ROUTERS


@ROUTERS.register("prefix_affinity")
class PrefixAffinityRouter(Router):
    """SGLang's cache-aware rule on outstanding requests and the router's prefix index.

    The cluster is *out of balance* when the most and least loaded replicas differ by more than
    `balance_abs_threshold` outstanding requests and the most loaded has more than
    `balance_rel_threshold` times the least loaded's; then the least loaded replica takes the
    request. Otherwise the replica with the most of the request's leading blocks cached wins (fewest
    outstanding, then lowest index, among equals) if that covers more than `cache_threshold` of the
    prompt's full blocks; below that (a new conversation, a prompt shorter than a block) the replica
    whose cache the router's index sees as smallest takes it (`indexed_blocks`; then fewest
    outstanding, lowest index), which spreads new prefixes over the caches. Defaults are those of
    SGLang's router (0.3, 64, 1.5). No state of its own.
    """

    uses_replica_state = True

    def __init__(self, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5) -> None:
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold!r}")
        if not isinstance(balance_abs_threshold, int) or balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be an int >= 0, got {balance_abs_threshold!r}")
        if not balance_rel_threshold >= 1.0:
            raise ValueError(f"balance_rel_threshold must be >= 1, got {balance_rel_threshold!r}")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def out_of_balance(self, replicas: Sequence[ReplicaLoad]) -> bool:
        most = max(r.outstanding for r in replicas)
        least = min(r.outstanding for r in replicas)
        return most - least > self.balance_abs_threshold and most > least * self.balance_rel_threshold

    def route(self, request: RouteRequest, replicas: Sequence[ReplicaLoad], now: float) -> int:
        if self.out_of_balance(replicas):
            return least_loaded(replicas).index
        if request.num_prompt_blocks:
            best = min(replicas, key=lambda r: (-r.cached_blocks, r.outstanding, r.index))
            if best.cached_blocks / request.num_prompt_blocks > self.cache_threshold:
                return best.index
        return min(replicas, key=lambda r: (r.indexed_blocks, r.outstanding, r.index)).index
