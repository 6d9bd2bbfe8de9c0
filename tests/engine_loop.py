"""The live engine's loop on a fake clock, for parity tests: the same `ServingStep` the engine's
thread runs, requests added as the engine adds them (those that arrived before each step), and a
fixed fake executor instead of the model."""

from __future__ import annotations

from sagellm.core.loop import ServingStep
from sagellm.core.outputs import SchedulerOutput, StepResult
from sagellm.metrics import RequestRecord
from simulator.build import build_scheduler
from simulator.config import SimulationConfig
from simulator.cost.base import ConstantCostModel
from simulator.sim import Simulation
from simulator.workloads import generate


class FixedFakeExecutor:
    """The engine's executor replaced by a fake: every step takes `seconds` and samples token 0."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def execute(self, out: SchedulerOutput) -> StepResult:
        return StepResult(out.step_id, {rid: 0 for rid, s in zip(out.request_ids, out.samples) if s}, (), self.seconds)


def engine_loop_outputs(config: SimulationConfig, executor: FixedFakeExecutor
                        ) -> tuple[list[SchedulerOutput], list[RequestRecord]]:
    """Every `SchedulerOutput` of the engine's loop over `config`'s workload, and the finished
    requests' records sorted by id. Requests are built exactly as the simulator builds them."""
    sim = Simulation(config, cost_model=ConstantCostModel(1.0))
    sched = build_scheduler(sim.shape, config.sagellm, sim.num_blocks)
    trace = list(generate(config.workload, config.base_dir))
    now, i, outputs, finished = 0.0, 0, [], []
    while i < len(trace) or sched.has_unfinished():
        if not sched.has_unfinished() and trace[i].arrival_time > now:
            now = trace[i].arrival_time  # idle: the loop blocks until the next request arrives
        while i < len(trace) and trace[i].arrival_time <= now:
            sched.add_request(sim._request(trace[i], sim.shape.vocab_size, i))
            i += 1
        step = ServingStep.start(sched, executor.execute, now)
        if not isinstance(step, ServingStep):  # nothing to execute: the engine schedules again
            assert step.preempted_ids or i < len(trace), "nothing can progress and nothing will arrive"
            if not step.preempted_ids:
                now = trace[i].arrival_time
            continue
        outputs.append(step.output)
        now += step.result.duration
        finished += step.finish(now).finished
    return outputs, sorted((RequestRecord.from_request(r) for r in finished), key=lambda r: r.request_id)
