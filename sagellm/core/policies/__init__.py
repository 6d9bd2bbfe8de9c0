"""Policies: small classes that decide; the mechanisms (scheduler, router, KV manager) act.

Each kind has a registry (`SCHEDULING_POLICIES`, ...). A policy is named in a config by its
registered name (`scheduler.policy: sjf`) or by a dotted path to a class of one's own
(`scheduler.policy: mylab.policies:EDF`), so a researcher's policy needs no change to sagellm and
runs unchanged in the live engine and the simulator.
"""

from sagellm.core.policies.registry import PolicyError, Registry
from sagellm.core.policies.scheduling import SCHEDULING_POLICIES, SchedulingPolicy, make_scheduling_policy

__all__ = ["SCHEDULING_POLICIES", "PolicyError", "Registry", "SchedulingPolicy", "make_scheduling_policy"]
