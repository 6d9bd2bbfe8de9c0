"""What a router sees and the contract it keeps (standard library only)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RouteRequest:
    """The request being placed: what a router may look at (no token ids)."""

    request_id: str
    num_prompt_tokens: int
    num_prompt_blocks: int  # full KV blocks in the prompt: the most `ReplicaLoad.cached_blocks` can be
    max_new_tokens: int
    tenant: str = ""
    priority: int = 0


@dataclass(frozen=True)
class ReplicaLoad:
    """One live replica as the router sees it when a request arrives.

    `outstanding` counts the requests routed to it and not finished yet (exact). The replica
    reports `queued_prompt_tokens` (prompt tokens of waiting requests still to prefill) and
    `kv_usage` (fraction of its device KV blocks in use) at the end of each of its steps, so they are
    as of its latest step. `cached_blocks` is how many of this request's leading prompt blocks the
    router's prefix index places on the replica (what earlier requests sent there brought, within
    its KV capacity, least recently routed forgotten first), 0 without prefix caching, and
    `indexed_blocks` how many blocks that index holds for the replica in all (the size of the
    router's picture of its cache). The last four are filled only for a router whose
    `uses_replica_state` is true (0 otherwise).
    """

    index: int
    outstanding: int
    queued_prompt_tokens: int = 0
    kv_usage: float = 0.0
    cached_blocks: int = 0
    indexed_blocks: int = 0


class Router(ABC):
    """Picks the replica for each new request. A policy: it decides, the cluster acts.

    Contract: `route(request, replicas, now)` returns the `index` of one of `replicas` (the live
    ones, never empty, in index order); `now` is the caller's clock in seconds. It may keep state
    between calls (a cursor, a seeded generator) but must not touch the requests or replicas.
    Routers are built with the keyword arguments of `cluster.router_args`, and the same object
    type routes in the live `ClusterEngine` and in the simulator. A router that reads
    `queued_prompt_tokens`, `kv_usage`, `cached_blocks` or `indexed_blocks` sets `uses_replica_state = True`
    (the replicas then report their state after every step and the prefix index is kept).
    """

    name = ""  # set by the registry
    uses_replica_state = False

    @abstractmethod
    def route(self, request: RouteRequest, replicas: Sequence[ReplicaLoad], now: float) -> int:
        """The index of the replica that serves `request`."""


def least_loaded(replicas: Sequence[ReplicaLoad]) -> ReplicaLoad:
    """The replica with the fewest outstanding requests (lowest index on ties)."""
    return min(replicas, key=lambda r: r.outstanding)
