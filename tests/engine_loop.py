"""The live engine's loop on a fake clock, for parity tests: the same `ServingStep` the engine's
thread runs, requests added as the engine adds them (those that arrived before each step), and a
fixed fake executor instead of the model."""

from __future__ import annotations

from sagellm.core.loop import ServingStep
from sagellm.core.outputs import SchedulerOutput, StepResult
from sagellm.core.policies.routing import ClusterView, replica_state, route_request
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
        finished += step.finish(now)
    return outputs, sorted((RequestRecord.from_request(r) for r in finished), key=lambda r: r.request_id)


def cluster_loop_outputs(config: SimulationConfig, executor: FixedFakeExecutor
                         ) -> tuple[list[list[SchedulerOutput]], dict[str, int]]:
    """Every replica's `SchedulerOutput`s and each request's replica when `config`'s workload is
    served as a live `ClusterEngine` serves it: the coordinator routes each arrival through a
    `ClusterView` counting the requests it routed and has not seen finish, each worker runs the
    engine's loop (arrivals during a step join after it) and reports its state after every step."""
    sim = Simulation(config, cost_model=ConstantCostModel(1.0))
    n, kv = config.cluster.num_replicas, config.sagellm.kv_cache
    scheds = [build_scheduler(sim.shape, config.sagellm, sim.num_blocks) for _ in range(n)]
    view = ClusterView(config.cluster.make_router(), n, kv.block_size, sim.num_blocks,
                       kv.enable_prefix_caching, kv.tenant_isolation)
    trace = list(generate(config.workload, config.base_dir))
    steps: list[ServingStep | None] = [None] * n
    ends_at = [0.0] * n
    inboxes: list[list] = [[] for _ in range(n)]
    outputs: list[list[SchedulerOutput]] = [[] for _ in range(n)]
    tracked: dict[str, int] = {}
    placed: dict[str, int] = {}

    def start(r: int, now: float) -> None:
        while scheds[r].has_unfinished():
            step = ServingStep.start(scheds[r], executor.execute, now)
            if isinstance(step, ServingStep):
                steps[r], ends_at[r] = step, now + step.result.duration
                outputs[r].append(step.output)
                return
            if not step.preempted_ids:
                return

    def end_step(r: int) -> None:
        step, steps[r], end = steps[r], None, ends_at[r]
        for req in step.finish(end):
            del tracked[req.request_id]
        for req in inboxes[r]:
            scheds[r].add_request(req)
        inboxes[r].clear()
        view.report(r, replica_state(scheds[r]))
        start(r, end)

    i = 0
    while i < len(trace) or any(steps):
        ends = [(ends_at[r], r) for r, s in enumerate(steps) if s is not None]
        if ends and (i == len(trace) or min(ends)[0] <= trace[i].arrival_time):
            end_step(min(ends)[1])
            continue
        tr = trace[i]
        req = sim._request(tr, sim.shape.vocab_size, i)
        counts = [0] * n
        for r in tracked.values():
            counts[r] += 1
        route = route_request(req.request_id, req.prompt_token_ids, tr.output_len, kv.block_size, req.tenant,
                              req.priority)
        r = view.route(route, req.prompt_token_ids, counts, None, tr.arrival_time)
        tracked[req.request_id] = placed[req.request_id] = r
        if steps[r] is None:
            scheds[r].add_request(req)
            start(r, tr.arrival_time)
        else:
            inboxes[r].append(req)
        i += 1
    return outputs, placed
