"""An example scheduling policy of one's own: earliest deadline first.

Run it from any config or experiment file with a dotted path, no change to sagellm needed:

    sagellm:
      scheduler: {policy: "examples.policies.deadline:EarliestDeadlineFirst",
                  policy_args: {ttft_targets_s: {interactive: 0.5, batch: 10.0}}}
"""

from collections.abc import Mapping, Sequence

from sagellm.core.policies import SchedulingPolicy
from sagellm.core.request import Request


class EarliestDeadlineFirst(SchedulingPolicy):
    """Each request's deadline is its arrival time plus its tenant's TTFT target (`default_s` for
    other tenants). Admit the earliest deadline first; preempt the running request whose deadline
    is latest. No state, so it needs none of the hooks."""

    def __init__(self, ttft_targets_s: Mapping[str, float] | None = None, default_s: float = 2.0) -> None:
        self.targets = dict(ttft_targets_s or {})
        self.default_s = float(default_s)

    def deadline(self, request: Request) -> float:
        return request.arrival_time + self.targets.get(request.tenant, self.default_s)

    def order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        return sorted(waiting, key=lambda r: (self.deadline(r), r.arrival_time))

    def victim(self, running: Sequence[Request], now: float) -> Request:
        return max(running, key=lambda r: (self.deadline(r), r.arrival_time))
