"""Fair share between tenants by a Virtual Token Counter (standard library only).

"Fairness in Serving Large Language Models", Sheng et al., OSDI'24: each tenant has a counter of
the weighted tokens it has been served; the tenant with the least service goes first, and a tenant
that comes back after being idle starts from the least counter of the active tenants, so idle time
earns no credit.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

from sagellm.core.policies.scheduling.base import SchedulingPolicy
from sagellm.core.policies.scheduling.registry import SCHEDULING_POLICIES
from sagellm.core.request import Request


@SCHEDULING_POLICIES.register("fair")
class VirtualTokenCounter(SchedulingPolicy):
    """Admit from the tenant with the least weighted service first (its earliest request), counting
    `prompt_weight` per prompt token computed and `output_weight` per output token, divided by the
    tenant's weight (`tenant_weights`, default 1). Waiting requests are ordered by replaying that
    choice with each admission's prompt charged ahead of time; preempt the latest request of the
    tenant with the most service. Side effects: the hooks update the counters."""

    tracks_service = True

    def __init__(self, prompt_weight: float = 1.0, output_weight: float = 2.0,
                 tenant_weights: Mapping[str, float] | None = None) -> None:
        for name, value in (("prompt_weight", prompt_weight), ("output_weight", output_weight)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        weights = dict(tenant_weights or {})
        for tenant, weight in weights.items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
                raise ValueError(f"tenant_weights[{tenant!r}] must be a number > 0, got {weight!r}")
        self.prompt_weight, self.output_weight = float(prompt_weight), float(output_weight)
        self.tenant_weights = weights
        self.counters: dict[str, float] = {}
        self.active: dict[str, int] = {}  # unfinished requests per tenant

    def _weight(self, tenant: str) -> float:
        return self.tenant_weights.get(tenant, 1.0)

    def on_arrival(self, request: Request, now: float) -> None:
        tenant = request.tenant
        if not self.active.get(tenant):
            busy = [self.counters.get(t, 0.0) for t, n in self.active.items() if n]
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), min(busy, default=0.0))
        self.active[tenant] = self.active.get(tenant, 0) + 1

    def on_finish(self, request: Request, now: float) -> None:
        self.active[request.tenant] -= 1

    def on_service(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        tenant = request.tenant
        charge = self.prompt_weight * prompt_tokens + self.output_weight * output_tokens
        self.counters[tenant] = self.counters.get(tenant, 0.0) + charge / self._weight(tenant)

    def order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        queues: dict[str, list[Request]] = {}
        for req in waiting:  # each tenant's requests keep the queue's (arrival) order
            queues.setdefault(req.tenant, []).append(req)
        heap = [(self.counters.get(t, 0.0), reqs[0].arrival_time, t) for t, reqs in queues.items()]
        heapq.heapify(heap)
        heads = dict.fromkeys(queues, 0)
        ordered: list[Request] = []
        while heap:
            counter, _, tenant = heapq.heappop(heap)
            req = queues[tenant][heads[tenant]]
            ordered.append(req)
            heads[tenant] += 1
            if heads[tenant] < len(queues[tenant]):
                nxt = queues[tenant][heads[tenant]]
                counter += self.prompt_weight * (req.num_tokens - req.num_computed_tokens) / self._weight(tenant)
                heapq.heappush(heap, (counter, nxt.arrival_time, tenant))
        return ordered

    def victim(self, running: Sequence[Request], now: float) -> Request:
        return max(running, key=lambda r: (self.counters.get(r.tenant, 0.0), r.arrival_time))
