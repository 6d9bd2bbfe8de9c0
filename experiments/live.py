"""The live side of an experiment: replay a trace, open loop, against the engine's async API."""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field, replace
from typing import Any

from sagellm.backends.idle_speed_probe import median_seconds
from sagellm.config import ConfigError, SageLLMConfig
from sagellm.metrics import RequestRecord, handoff_summary, summarize
from sagellm.metrics.summary import SLO
from simulator.workloads import TraceRequest, prompt_token_ids


@dataclass
class LiveResult:
    """Per-request records (times from the run's start), all inter-token latencies, the summary,
    every step's batch shape, seconds and worker (`sagellm.engine.StepTiming` with `end_time`
    from the run's start; a cluster's steps come from all its workers), and with an idle speed
    probe its timings during the run (`ProbeSample`s, `end_time` from the run's start)."""

    records: list[RequestRecord]
    inter_token_latencies: Any
    summary: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    steps: list[Any] = field(default_factory=list)
    probe: list[Any] = field(default_factory=list)


class LiveRunner:
    """Owns one initialized engine (`SageLLMEngine`, or a `ClusterEngine` of worker processes for
    mode strict or `num_replicas` > 1) and replays traces against it.

    Contract: `run(trace)` submits each request at its trace arrival time after the run's start
    (open loop: a slow engine does not slow the arrivals), greedy, with `ignore_eos` and
    `max_new_tokens` = the trace's output length, so the engine does exactly the simulator's work;
    prompts are the same synthetic token ids the simulator uses. It waits for every request and
    returns their records. With `idle_probe`, an `IdleSpeedProbe` runs beside the engine for the
    runner's life and each run keeps the probe's timings made during it. `close()` shuts the
    engine (and the probe) down. Side effects: runs the model.
    """

    def __init__(self, config: SageLLMConfig, num_replicas: int = 1, router: str = "least_outstanding",
                 idle_probe: bool = False, router_args: dict[str, Any] | None = None) -> None:
        from sagellm.backends.idle_speed_probe import IdleSpeedProbe
        from sagellm.engine import create_engine

        self.config = config
        self.engine = create_engine(config, num_replicas, router, router_args).initialize()
        self.vocab_size = self.engine.vocab_size
        self.last_probe: list = []  # the samples of the latest `probe()`
        self.idle_probe = IdleSpeedProbe().start() if idle_probe else None

    def warmup(self, num_requests: int) -> None:
        from sagellm.engine import GenerateRequest

        if num_requests:
            self.engine.generate_batch([
                GenerateRequest(prompt_token_ids=tuple(range(1, 33 + 8 * k)), max_new_tokens=8, temperature=0.0,
                                ignore_eos=True, request_id=f"warmup-{time.monotonic_ns()}-{k}")
                for k in range(num_requests)
            ])

    def probe(self) -> list:
        """Time the speed probe's steps on the idle engine (on every worker at once for a cluster);
        also kept as `last_probe`."""
        self.last_probe = self.engine.probe()
        return self.last_probe

    def run(self, trace: list[TraceRequest], slo: SLO | None = None, timeout_s: float = 1800.0) -> LiveResult:
        from sagellm.engine import GenerateRequest
        from sagellm.engine.replay import replay

        context = getattr(self.engine, "max_model_len", None)
        too_long = next((tr for tr in trace if context is not None and tr.prompt_len >= context), None)
        if too_long is not None:  # refused before any token ids are made
            raise ConfigError(f"workload.prompt_len: request {too_long.request_id!r} has {too_long.prompt_len} prompt "
                              f"tokens but the live engine's context window is {context}; cap prompts with "
                              "workload.max_prompt_len")
        timed = [
            (tr.arrival_time, GenerateRequest(prompt_token_ids=tuple(prompt_token_ids(tr, self.vocab_size, i)),
                                              request_id=tr.request_id, max_new_tokens=tr.output_len,
                                              temperature=0.0, ignore_eos=True, tenant=tr.tenant,
                                              priority=tr.priority))
            for i, tr in enumerate(trace)
        ]
        from sagellm.backends.cpu_time import CpuTimes, steal_fraction

        self.engine.reset_prefix_cache()  # each run starts cold: no KV left from warm-up or earlier runs
        handoffs_before = len(getattr(self.engine, "handoff_seconds", ()))
        busy_before = _busy(self.engine.get_stats())
        self.engine.start_step_log()
        cpu_before = CpuTimes.read()
        if self.idle_probe is not None:
            self.idle_probe.take()  # timings from before the run
        try:
            outputs, start = replay(self.engine, timed, timeout_s)
        finally:
            steps = self.engine.take_step_log()
        end = time.monotonic()
        probe = [] if self.idle_probe is None else [replace(p, end_time=p.end_time - start)
                                                    for p in self.idle_probe.take() if start <= p.end_time <= end]
        steal = steal_fraction(cpu_before, CpuTimes.read())
        bad = [o for o in outputs if o.finish_reason in ("error", "abort")]
        if bad:
            raise RuntimeError(f"live run: {len(bad)} request(s) failed, first: {bad[0].request_id}: {bad[0].error}")
        records = [o.record.shifted(start) for o in outputs]
        itls = array("d")
        for o in outputs:
            itls.extend(o.metrics.inter_token_latencies)
        summary = summarize(records, itls, slo)
        stats = self.engine.get_stats()
        summary["prefix_hit_rate"] = stats["kv"]["hit_rate"]
        # Seconds each worker spent in steps during the run (the simulator's `replica_busy_seconds`).
        busy = [after - before for before, after in zip(busy_before, _busy(stats))]
        info = {"engine_stats": stats, "cpu_steal": steal, "worker_busy_seconds": busy}
        handoffs = getattr(self.engine, "handoff_seconds", [])[handoffs_before:]
        if handoffs:
            info["handoff"] = handoff_summary(handoffs)
            # (bytes, seconds) of each hand-off: the serving reference prices them by the link's fit
            info["handoffs"] = [[int(b), s] for b, s in zip(self.engine.handoff_bytes[handoffs_before:], handoffs)]
            summary["handoff_mean_s"] = info["handoff"]["mean_s"]
        steps = [replace(s, end_time=s.end_time - start) for s in steps]
        if self.idle_probe is not None:
            info["idle_probe"] = {"samples": len(probe), "median_s": median_seconds(probe)}
        return LiveResult(records, itls, summary, info, steps, probe)

    def close(self) -> None:
        try:
            if self.idle_probe is not None:
                self.idle_probe.stop()
                self.idle_probe = None
        finally:
            self.engine.shutdown()



def _busy(stats: dict[str, Any]) -> list[float]:
    """Step seconds so far per worker (one entry for an in-process engine)."""
    return [w["busy_s"] for w in stats["workers"]] if "workers" in stats else [stats["busy_s"]]
