"""One simulated serving replica: the real scheduler, the predicted executor, a SimPy process."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator

import simpy

from sagellm.core.loop import ServingStep
from sagellm.core.outputs import SchedulerOutput, StepResult
from sagellm.core.policies.routing import ReplicaState, replica_state
from sagellm.core.request import Request
from sagellm.core.scheduler import Scheduler
from sagellm.metrics import MetricsCollector
from simulator.executor import PredictedExecutor


class Replica:
    """Runs `schedule -> execute -> update` in simulated time, like the engine's loop.

    Contract: `submit(request)` queues a request now (raises ValueError if the scheduler rejects
    it); during a step it waits in an inbox and is added once the step's result is applied, as the
    engine's loop adds what arrived during a forward pass (a refusal then goes to `on_reject`). The
    process sleeps while there is no work and wakes on the next submit. Every step takes
    the executor's predicted duration; finished requests go to `collector`, or to the attribute
    `on_finish(request, step_start, step_seconds)` when one is set (a STRICT cluster sets it to
    hand prefilled requests off).
    `on_step`, if given, sees every `SchedulerOutput` (used by tests and traces). When the
    attribute `on_state(index, ReplicaState)` is set, it gets the replica's state after each step,
    as a live worker reports it to its cluster's router.
    """

    def __init__(self, env: simpy.Environment, index: int, scheduler: Scheduler, executor: PredictedExecutor,
                 collector: MetricsCollector, on_step: Callable[[SchedulerOutput], None] | None = None) -> None:
        self.env = env
        self.index = index
        self.scheduler = scheduler
        self.executor = executor
        self.collector = collector
        self.on_step = on_step
        self.on_finish: Callable[[Request, float, float], None] | None = None
        self.num_steps = 0
        self.busy_time = 0.0
        self._wakeup: simpy.Event | None = None
        self._in_step = False
        self._inbox: list[Request] = []
        self._step_start = 0.0
        # Called for a request that arrived during a step and that the scheduler then refused.
        self.on_reject: Callable[[Request, ValueError], None] | None = None
        self.on_state: Callable[[int, ReplicaState], None] | None = None
        self.process = env.process(self._run())

    @property
    def is_sleeping(self) -> bool:
        """Waiting for a submit (no step in flight)."""
        return self._wakeup is not None

    @property
    def num_outstanding(self) -> int:
        return self.scheduler.num_unfinished + len(self._inbox)

    def held_requests(self) -> Iterator[Request]:
        """Every request this replica holds: in its scheduler, or in its inbox during a step."""
        yield from self.scheduler.requests.values()
        yield from self._inbox

    def submit(self, request: Request) -> None:
        if self._in_step:  # as the engine's inbox: added once the step in flight has been applied
            self._inbox.append(request)
            return
        self.scheduler.add_request(request)
        if self._wakeup is not None and not self._wakeup.triggered:
            self._wakeup.succeed()

    def _take_inbox(self) -> None:
        """Add the requests that arrived during the step just applied, in arrival order."""
        inbox, self._inbox = self._inbox, []
        for request in inbox:
            try:
                self.scheduler.add_request(request)
            except ValueError as exc:
                if self.on_reject is None:
                    raise
                self.on_reject(request, exc)

    def _run(self) -> Generator[simpy.Event, None, None]:
        env, scheduler, collector = self.env, self.scheduler, self.collector
        kv = scheduler.kv
        while True:
            if not scheduler.requests:
                self._wakeup = env.event()
                yield self._wakeup
                self._wakeup = None
            # Steps that end before the next event anywhere in the simulation cannot be affected by
            # it, so they run back to back on a local clock and SimPy sees one timeout for all of
            # them (the same results as one timeout per step, with far fewer events).
            now = env.now
            horizon = env.peek()
            while True:
                self._step_start = now
                step = ServingStep.start(scheduler, self._execute, now)
                if not isinstance(step, ServingStep):
                    out = step
                    if out.preempted_ids and scheduler.requests:
                        continue  # a step that only preempted: schedule again now, as the engine does
                    break
                out, result = step.output, step.result
                end = now + result.duration
                if end >= horizon:  # let the events before the step's end (arrivals) happen meanwhile
                    self._in_step = True
                    yield env.timeout(end - env.now)
                    self._in_step = False
                    now = env.now
                else:
                    now = end
                finished = step.finish(now)
                if self._inbox:
                    self._take_inbox()
                if not out.request_ids:
                    if out.preempted_ids and scheduler.requests:
                        continue  # it only preempted (and moved KV): schedule again now, as the engine does
                    break  # only KV operations ran
                self.num_steps += 1
                self.busy_time += result.duration
                for req in finished:
                    if self.on_finish is None:
                        collector.add(req, self.index)
                    else:
                        self.on_finish(req, now - result.duration, result.duration)
                collector.sample_kv(now, kv.usage, len(scheduler.running), len(scheduler.waiting))
                if self.on_state is not None:
                    self.on_state(self.index, replica_state(scheduler))
                if not scheduler.requests or now >= horizon:
                    break
            if now > env.now:
                yield env.timeout(now - env.now)
            if out.request_ids or not scheduler.requests:
                continue
            # Nothing fits right now (cannot happen with a live request, kept as a guard): wait for
            # the next arrival instead of spinning.
            self._wakeup = env.event()
            yield self._wakeup
            self._wakeup = None

    def _execute(self, out: SchedulerOutput) -> StepResult:
        """The executor's prediction for a step that starts at `_step_start`."""
        if self.on_step is not None:
            self.on_step(out)
        return self.executor.execute(out, self._step_start)

