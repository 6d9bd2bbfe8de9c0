"""The cluster's view of its replicas, built the same way live and simulated (standard library only).

`ClusterView` is the mechanism around a `Router`: it keeps each replica's latest reported state and
a prefix index per replica, builds the `ReplicaLoad`s a router sees, calls it and checks its answer.
The live `ClusterEngine` and the simulator both route through it, so a router gets the same kind of
inputs on both sides.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sagellm.core.kv.hashing import extend_block_hashes, root_hash
from sagellm.core.policies.registry import PolicyError
from sagellm.core.policies.routing.base import ReplicaLoad, RouteRequest


@dataclass(frozen=True)
class ReplicaState:
    """What a replica reports at the end of each step."""

    queued_prompt_tokens: int
    kv_usage: float


def replica_state(scheduler: Any) -> ReplicaState:
    """The state a replica whose scheduler is `scheduler` reports after a step."""
    queued = sum(r.num_prompt_tokens - r.num_computed_tokens for r in scheduler.waiting)
    return ReplicaState(queued, scheduler.kv.usage)


class PrefixIndex:
    """Block hashes a replica was sent, least recently routed first, at most `capacity` of them.

    An approximation of the replica's prefix cache kept by the router (as SGLang's router keeps an
    approximate radix tree per worker): every full prompt block of a routed request is recorded;
    past `capacity` blocks the least recently routed are forgotten.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def leading_hits(self, hashes: Sequence[int]) -> int:
        """How many of `hashes`, from the first, the index holds."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def record(self, hashes: Sequence[int]) -> None:
        blocks = self._blocks
        for h in hashes:
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)


class ClusterView:
    """Routes requests over `num_replicas` replicas with `router`.

    Contract: `route(request, prompt_token_ids, outstanding, alive, now)` returns the chosen
    replica's index: `outstanding[i]` is replica i's count of routed, unfinished requests and
    `alive[i]` whether it can take work (None: all can). The router's answer must be a live
    replica's index, else `PolicyError` naming `field`. With a router that `uses_replica_state`,
    `report(i, state)` records replica i's state after each of its steps, and every routed prompt's
    blocks go into the chosen replica's prefix index (`capacity_blocks` each, hashed as the
    replicas hash them: `block_size`, one chain per tenant under `tenant_isolation`); with
    `prefix_caching` off, `cached_blocks` stays 0. Side effects: the router's own state.
    """

    def __init__(self, router: Any, num_replicas: int, block_size: int, capacity_blocks: int,
                 prefix_caching: bool = True, tenant_isolation: bool = False,
                 field: str = "cluster.router") -> None:
        if num_replicas <= 0:
            raise ValueError(f"num_replicas must be > 0, got {num_replicas}")
        self.router = router
        self.num_replicas = num_replicas
        self.block_size = block_size
        self.field = field
        self.tenant_isolation = tenant_isolation
        self.uses_state = bool(getattr(router, "uses_replica_state", False))
        self.indexes = [PrefixIndex(capacity_blocks) for _ in range(num_replicas)] \
            if self.uses_state and prefix_caching else None
        self.states = [ReplicaState(0, 0.0)] * num_replicas
        self.num_reports = [0] * num_replicas

    def report(self, index: int, state: ReplicaState) -> None:
        self.states[index] = state
        self.num_reports[index] += 1

    def route(self, request: RouteRequest, prompt_token_ids: Sequence[int], outstanding: Sequence[int],
              alive: Sequence[bool] | None, now: float) -> int:
        live = [i for i in range(self.num_replicas) if alive is None or alive[i]]
        if not live:
            raise ValueError("no live replica to route to")
        hashes = self._hashes(request, prompt_token_ids) if self.indexes is not None else ()
        loads = [self._load(i, outstanding[i], hashes) for i in live]
        pick = self.router.route(request, loads, now)
        if pick not in live or isinstance(pick, bool):
            raise PolicyError(f"{self.field}: {type(self.router).__name__}.route returned {pick!r}, "
                              f"which is not the index of a live replica (live: {live})")
        if self.indexes is not None:
            self.indexes[pick].record(hashes)
        return pick

    def _load(self, index: int, outstanding: int, hashes: Sequence[int]) -> ReplicaLoad:
        if not self.uses_state:
            return ReplicaLoad(index, outstanding)
        state = self.states[index]
        if self.indexes is None:
            return ReplicaLoad(index, outstanding, state.queued_prompt_tokens, state.kv_usage)
        held = self.indexes[index]
        return ReplicaLoad(index, outstanding, state.queued_prompt_tokens, state.kv_usage,
                           held.leading_hits(hashes), len(held))

    def _hashes(self, request: RouteRequest, prompt_token_ids: Sequence[int]) -> list[int]:
        ids = prompt_token_ids
        root = root_hash(request.tenant, self.tenant_isolation)
        return extend_block_hashes([], lambda s, e: tuple(ids[s:e]), self.block_size, root, len(ids))


def route_request(request_id: str, prompt_token_ids: Sequence[int], max_new_tokens: int, block_size: int,
                  tenant: str = "", priority: int = 0) -> RouteRequest:
    """The `RouteRequest` for a prompt of `prompt_token_ids`."""
    n = len(prompt_token_ids)
    return RouteRequest(request_id, n, n // block_size, max_new_tokens, tenant, priority)
