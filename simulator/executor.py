"""The predicted executor: turns a `SchedulerOutput` into a `StepResult` whose duration a cost model predicts."""

from __future__ import annotations

from collections.abc import Callable
from itertools import compress

from sagellm.core.kv.tiers import op_groups
from sagellm.core.outputs import SchedulerOutput, StepResult
from simulator.cost.base import CostModel


class PredictedExecutor:
    """Stands in for the engine's executor in the simulator.

    Contract: `execute(out, now)` returns a `StepResult` with `duration = cost_model.step_time(out)`
    (times `speed(now)`, below) and
    one sampled token for every scheduled request that samples. Token values are not modelled:
    every sampled token is `token_id`; the simulator builds requests with `ignore_eos` and
    `max_new_tokens` equal to the trace's output length, so each request ends exactly there.
    The step's KV operations run before it, as the engine runs them: each run of same-direction
    copies is one transfer of `block_bytes` per block, priced by `cost_model.transfer_time`
    (`transfer_seconds` adds them up). With `layerwise_layers` = L (`KVGranularity.LAYER`) the
    copies between device and host overlap the forward pass layer by layer, as the engine runs
    them: the step takes file copies + max(compute, other copies) + other copies / L (the first
    layer's copies overlap nothing; the engine reads and writes the NVMe file before and after).
    With `speed` (seconds of simulated time -> step-time multiplier, e.g. a
    `simulator.speed_trace.SpeedTrace` of the machine during a live run), the step's compute time
    is multiplied by `speed(now)`, `now` being when the step starts. No other side effects.
    """

    def __init__(self, cost_model: CostModel, token_id: int = 0, block_bytes: int = 0,
                 layerwise_layers: int = 0, speed: Callable[[float], float] | None = None) -> None:
        self.cost_model = cost_model
        self.token_id = token_id
        self.block_bytes = block_bytes
        self.layerwise_layers = layerwise_layers
        self.speed = speed
        self.transfer_seconds = 0.0

    def execute(self, out: SchedulerOutput, now: float = 0.0) -> StepResult:
        ids, batch = out.request_ids, out.batch
        every_row_samples = batch[3] == len(ids) if batch is not None else False not in out.samples
        sampled = dict.fromkeys(ids if every_row_samples else compress(ids, out.samples), self.token_id)
        duration = self.cost_model.step_time(out)
        if self.speed is not None:
            duration *= self.speed(now)
        if out.kv_ops:
            file_copies, other = self.kv_ops_time(out)
            layers = self.layerwise_layers
            if layers:
                duration = file_copies + max(duration, other) + other / layers
            else:
                duration += file_copies + other
        return StepResult(out.step_id, sampled, (), duration)

    def kv_ops_time(self, out: SchedulerOutput) -> tuple[float, float]:
        """Predicted seconds of the step's KV copies: (to or from NVMe, the others)."""
        file_copies = other = 0.0
        transfer = self.cost_model.transfer_time
        for src, dst, ops in op_groups(out.kv_ops):
            if dst is None:
                continue
            t = transfer(len(ops) * self.block_bytes, src, dst)
            if "nvme" in (src, dst):
                file_copies += t
            else:
                other += t
        self.transfer_seconds += file_copies + other
        return file_copies, other
