"""The body of the serving loop, one copy for the live engine and the simulator (standard library only).

Both sides run `ServingStep`: schedule at `now`, execute (the engine runs the model, the simulator
predicts the step's duration), and apply the result at the time the step ends. The only things
that differ are the executor and the clock, which is why the simulator makes the engine's decisions.
"""

from __future__ import annotations

from collections.abc import Callable

from sagellm.core.outputs import SchedulerOutput, StepResult
from sagellm.core.request import Request
from sagellm.core.scheduler import Scheduler


class StepFailed(Exception):
    """The executor or the scheduler's update raised for `output`; `__cause__` says why. The
    scheduler has handed out the output's blocks; the caller decides what to do with its requests."""

    def __init__(self, output: SchedulerOutput) -> None:
        super().__init__(f"step {output.step_id} failed")
        self.output = output


class ServingStep:
    """One pass of the loop in two halves, so that the caller can wait in between: `start` schedules
    at `now` and executes; `finish(end)` applies the result at the time the step ended. The live
    engine calls them back to back (`end` is its clock after the forward pass); the simulator waits
    in SimPy time between them, so that arrivals before the step's end happen first.

    Contract: `start` returns the bare `SchedulerOutput` when it holds neither rows nor KV
    operations (nothing is executed). Errors of the executor or of the update
    are raised as `StepFailed` chained to the cause; errors of `schedule` itself propagate as they are.
    """

    __slots__ = ("scheduler", "output", "result")

    def __init__(self, scheduler: Scheduler, output: SchedulerOutput, result: StepResult) -> None:
        self.scheduler, self.output, self.result = scheduler, output, result

    @staticmethod
    def start(scheduler: Scheduler, execute: Callable[[SchedulerOutput], StepResult], now: float,
              ) -> ServingStep | SchedulerOutput:
        """Schedule at `now` and execute: a `ServingStep` to finish, or the bare output when there
        was nothing to execute."""
        output = scheduler.schedule(now)
        if not output.request_ids and not output.kv_ops:
            return output
        try:
            result = execute(output)
        except Exception as exc:
            raise StepFailed(output) from exc
        return ServingStep(scheduler, output, result)

    def finish(self, end: float) -> list[Request]:
        """Apply the result at time `end`; returns the requests that finished in the step."""
        try:
            return self.scheduler.update(self.output, self.result, end)
        except Exception as exc:
            raise StepFailed(self.output) from exc
