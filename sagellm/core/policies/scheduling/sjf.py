"""Shortest job (prompt) first, with aging so that nothing starves (standard library only)."""

from __future__ import annotations

from collections.abc import Sequence

from sagellm.core.policies.scheduling.base import SchedulingPolicy
from sagellm.core.policies.scheduling.registry import SCHEDULING_POLICIES
from sagellm.core.request import Request


@SCHEDULING_POLICIES.register("sjf")
class ShortestPromptFirst(SchedulingPolicy):
    """Admit the waiting request with the fewest tokens to compute first (its prompt, plus what it
    had generated when preempted); requests that have waited `max_wait_s` seconds or more go before
    all others, oldest first, so a long prompt waits at most about `max_wait_s`. Preempt the
    running request with the most tokens (latest arrival on ties). No state."""

    def __init__(self, max_wait_s: float = 30.0) -> None:
        if not max_wait_s > 0:
            raise ValueError(f"max_wait_s must be > 0, got {max_wait_s!r}")
        self.max_wait_s = float(max_wait_s)

    def order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        limit = now - self.max_wait_s
        return sorted(waiting, key=lambda r: (r.arrival_time > limit, r.num_tokens if r.arrival_time > limit else 0,
                                              r.arrival_time))

    def victim(self, running: Sequence[Request], now: float) -> Request:
        return max(running, key=lambda r: (r.num_tokens, r.arrival_time))
