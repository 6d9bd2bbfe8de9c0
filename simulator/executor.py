"""The predicted executor: turns a `SchedulerOutput` into a `StepResult` whose duration a cost model predicts."""

from __future__ import annotations

from itertools import compress

from sagellm.core.outputs import SchedulerOutput, StepResult
from simulator.cost.base import CostModel


class PredictedExecutor:
    """Stands in for the engine's executor in the simulator.

    Contract: `execute(out)` returns a `StepResult` with `duration = cost_model.step_time(out)` and
    one sampled token for every scheduled request that samples. Token values are not modelled:
    every sampled token is `token_id`; the simulator builds requests with `ignore_eos` and
    `max_new_tokens` equal to the trace's output length, so each request ends exactly there.
    No side effects.
    """

    def __init__(self, cost_model: CostModel, token_id: int = 0) -> None:
        self.cost_model = cost_model
        self.token_id = token_id

    def execute(self, out: SchedulerOutput) -> StepResult:
        sampled = dict.fromkeys(compress(out.request_ids, out.samples), self.token_id)
        return StepResult(out.step_id, sampled, (), self.cost_model.step_time(out))
