"""What every cost model answers: how long a step takes, how long moving KV bytes takes."""

from __future__ import annotations

from typing import Protocol

from sagellm.core.outputs import SchedulerOutput


class CostModel(Protocol):
    """Predicts time; never decides anything.

    `step_time(out)` is the seconds one executor step with `out` takes (0 for an empty step);
    `transfer_time(num_bytes, src_tier, dst_tier)` the seconds to move KV bytes between tiers
    ("hbm", "ddr", "nvme"; "hbm"-"hbm" is device to device). Both are pure functions of their input.
    """

    name: str

    def step_time(self, out: SchedulerOutput) -> float: ...

    def transfer_time(self, num_bytes: int, src_tier: str, dst_tier: str) -> float: ...


class ConstantCostModel:
    """Every non-empty step takes `step_seconds`; every transfer `transfer_seconds` (for tests and theory)."""

    def __init__(self, step_seconds: float, transfer_seconds: float = 0.0) -> None:
        if step_seconds <= 0:
            raise ValueError(f"step_seconds must be > 0, got {step_seconds}")
        self.step_seconds = step_seconds
        self.transfer_seconds = transfer_seconds
        self.name = f"constant({step_seconds:g}s)"

    def step_time(self, out: SchedulerOutput) -> float:
        return self.step_seconds if out.request_ids else 0.0

    def transfer_time(self, num_bytes: int, src_tier: str, dst_tier: str) -> float:
        return self.transfer_seconds if num_bytes else 0.0
