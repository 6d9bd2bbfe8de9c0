"""Shortest remaining processing time with oracle output lengths (standard library only)."""

from __future__ import annotations

from collections.abc import Sequence

from sagellm.core.policies.scheduling.base import SchedulingPolicy
from sagellm.core.policies.scheduling.registry import SCHEDULING_POLICIES
from sagellm.core.request import Request


def remaining_output(req: Request) -> int:
    """Output tokens still to generate, by the request's own `max_new_tokens` (the trace's output
    length in an experiment, where requests ignore EOS: an exact oracle)."""
    return req.sampling.max_new_tokens - len(req.output_token_ids)


@SCHEDULING_POLICIES.register("srpt_oracle")
class ShortestRemainingOracle(SchedulingPolicy):
    """Admit the waiting request with the fewest output tokens left first (arrival order on ties);
    preempt the running request with the most left (latest arrival on ties). The upper bound a
    perfect output-length predictor could reach (as in "Efficient LLM Scheduling by Learning to
    Rank", 2024, and S3/SSJF). No state."""

    def order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        return sorted(waiting, key=lambda r: (remaining_output(r), r.arrival_time))

    def victim(self, running: Sequence[Request], now: float) -> Request:
        return max(running, key=lambda r: (remaining_output(r), r.arrival_time))
