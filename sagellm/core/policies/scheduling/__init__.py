"""Scheduling policies, one file each, registered in `SCHEDULING_POLICIES` (standard library only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sagellm.core.policies.scheduling import fair, fcfs, priority, sjf, srpt  # noqa: F401  (they register)
from sagellm.core.policies.scheduling.base import SchedulingPolicy
from sagellm.core.policies.scheduling.registry import SCHEDULING_POLICIES


def make_scheduling_policy(spec: Any = "fcfs", args: Mapping[str, Any] | None = None,
                           field: str = "scheduler.policy") -> Any:
    """A new policy object: a registered name or 'package.module:Class', built with keyword `args`.
    `PolicyError` naming `field` when it cannot be found, imported or built."""
    return SCHEDULING_POLICIES.create(spec, field, args)


__all__ = ["SCHEDULING_POLICIES", "SchedulingPolicy", "make_scheduling_policy"]
