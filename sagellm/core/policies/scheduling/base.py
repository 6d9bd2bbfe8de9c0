"""The scheduling-policy contract: which waiting request is admitted first, which running one is
preempted (standard library only)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from sagellm.core.request import Request


class SchedulingPolicy(ABC):
    """Decides the order of admission and the victim of a preemption; the `Scheduler` does the rest
    (budget, chunking, blocks, preemption mechanics, messages).

    Contract: `order(waiting, now)` returns some of the waiting requests (each at most once, any
    it leaves out wait this step), in the order the scheduler should try to admit them; the
    scheduler admits them in that order and stops at the first that does not fit. `victim(running,
    now)` picks the running request to preempt when blocks run out (`running` is non-empty, in
    admission order). Neither may change a request. The hooks `on_arrival`, `on_service` (tokens a
    request had computed: prompt tokens prefilled and output tokens sampled in one step; called only
    when `tracks_service` is true) and `on_finish` let a policy keep its own accounting.
    `keeps_arrival_order`: `order` is the waiting queue as it is and `victim` the latest admitted, so
    the scheduler may keep its FCFS fast paths. A policy holds per-scheduler state: build one per
    scheduler. A class of one's own need not subclass this; it needs `order` and `victim`.
    """

    name: ClassVar[str] = ""
    keeps_arrival_order: ClassVar[bool] = False
    tracks_service: ClassVar[bool] = False

    @abstractmethod
    def order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        """The waiting requests to try this step, in the order to try them."""

    def victim(self, running: Sequence[Request], now: float) -> Request:
        return running[-1]

    def on_arrival(self, request: Request, now: float) -> None:  # noqa: B027 (a default: no accounting)
        """`request` has entered the scheduler."""

    def on_service(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:  # noqa: B027
        """One step computed `prompt_tokens` of `request`'s prompt and sampled `output_tokens`."""

    def on_finish(self, request: Request, now: float) -> None:  # noqa: B027
        """`request` has left the scheduler (finished, aborted or failed)."""
