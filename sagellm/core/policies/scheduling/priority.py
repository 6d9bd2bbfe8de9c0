"""Priority scheduling with vLLM's semantics (standard library only)."""

from __future__ import annotations

from collections.abc import Sequence

from sagellm.core.policies.scheduling.base import SchedulingPolicy
from sagellm.core.policies.scheduling.registry import SCHEDULING_POLICIES
from sagellm.core.request import Request


def _rank(req: Request) -> tuple[int, float]:
    return req.priority, req.arrival_time


@SCHEDULING_POLICIES.register("priority")
class Priority(SchedulingPolicy):
    """Admit by (priority, arrival time), lower priority values first; preempt the running request
    with the highest (priority, arrival time): the least important, latest arrival (vLLM's
    `--scheduling-policy priority`). No state."""

    def order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        return sorted(waiting, key=_rank)

    def victim(self, running: Sequence[Request], now: float) -> Request:
        return max(running, key=_rank)
