"""Policies: small classes that decide; the mechanisms (scheduler, router, KV manager) act.

Each kind has a registry (`SCHEDULING_POLICIES`, `ROUTERS`, ...). A policy is named in a config by its
registered name (`scheduler.policy: sjf`) or by a dotted path to a class of one's own
(`scheduler.policy: mylab.policies:EDF`), so a researcher's policy needs no change to sagellm and
runs unchanged in the live engine and the simulator.
"""

from sagellm.core.policies.registry import PolicyError, Registry
from sagellm.core.policies.routing import ROUTERS, ClusterView, Router, make_router
from sagellm.core.policies.scheduling import SCHEDULING_POLICIES, SchedulingPolicy, make_scheduling_policy

__all__ = ["ROUTERS", "SCHEDULING_POLICIES", "ClusterView", "PolicyError", "Registry", "Router", "SchedulingPolicy",
           "make_router", "make_scheduling_policy"]
