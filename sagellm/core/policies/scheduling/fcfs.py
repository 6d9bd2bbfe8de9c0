"""First come, first served: vLLM's default and sagellm's (standard library only)."""

from __future__ import annotations

from collections.abc import Sequence

from sagellm.core.policies.scheduling.base import SchedulingPolicy
from sagellm.core.policies.scheduling.registry import SCHEDULING_POLICIES
from sagellm.core.request import Request


@SCHEDULING_POLICIES.register("fcfs")
class FirstComeFirstServed(SchedulingPolicy):
    """Admit in arrival order (a preempted request goes back to the front); preempt the request
    admitted last. No state."""

    keeps_arrival_order = True

    def order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        return list(waiting)

    def victim(self, running: Sequence[Request], now: float) -> Request:
        return running[-1]
