"""Routers, one file each, registered in `ROUTERS`, and the cluster view that feeds them
(standard library only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sagellm.core.policies.routing import (  # noqa: F401  (they register)
    least_outstanding,
    power_of_two,
    prefix_affinity,
    random_choice,
    round_robin,
)
from sagellm.core.policies.routing.base import ReplicaLoad, Router, RouteRequest
from sagellm.core.policies.routing.registry import ROUTERS
from sagellm.core.policies.routing.view import ClusterView, ReplicaState, replica_state, route_request


def make_router(spec: Any = "round_robin", args: Mapping[str, Any] | None = None,
                field: str = "cluster.router") -> Any:
    """A new router: a registered name or 'package.module:Class', built with keyword `args`.
    `PolicyError` naming `field` when it cannot be found, imported or built."""
    return ROUTERS.create(spec, field, args)


__all__ = ["ROUTERS", "ClusterView", "ReplicaLoad", "ReplicaState", "RouteRequest", "Router", "make_router",
           "replica_state", "route_request"]
