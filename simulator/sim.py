"""`Simulation`: arrivals from a workload, replicas behind a router, all in SimPy time.

Each replica runs the real `sagellm.core` scheduler and KV manager built from the same
`SageLLMConfig` the engine uses; only step durations come from a cost model.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import simpy

from sagellm.config import ConfigError
from sagellm.core.kv.tiers import KVGranularity
from sagellm.core.outputs import SchedulerOutput
from sagellm.core.pd import InferenceMode, ScheduleMode
from sagellm.core.policies import ClusterView, PolicyError
from sagellm.core.policies.routing import route_request
from sagellm.core.request import Request, RequestStatus
from sagellm.core.sampling import SamplingParams
from sagellm.metrics import MetricsCollector, RequestRecord, handoff_summary, summarize
from simulator.build import build_cost_model, build_scheduler, kv_block_bytes, kv_num_blocks, resolve_shape
from simulator.config import SimulationConfig
from simulator.cost.base import CostModel
from simulator.executor import PredictedExecutor
from simulator.pd_cluster import StrictCluster
from simulator.replica import Replica
from simulator.workloads import TraceRequest, WorkloadError, generate, prompt_token_ids

# Requests in the replicas hold their prompts' token ids; past this many tokens (about 1 GiB of
# them) a run is stopped with an error instead of growing its queue until memory runs out.
MAX_OUTSTANDING_TOKENS = 2**27
OUTSTANDING_CHECK_EVERY = 1024


@dataclass
class SimulationResult:
    """What a run produced: per-request records, all inter-token latencies, KV usage samples
    (time, usage, running, waiting), the summary dict, and run facts (steps, wall time)."""

    config: SimulationConfig
    records: list[RequestRecord]
    inter_token_latencies: Any
    kv_usage: list[tuple[float, float, int, int]]
    summary: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0  # kept out of `info` so that written results are deterministic


class Simulation:
    """One simulated run of `config`.

    Contract: construction builds everything and raises `ConfigError` for bad settings;
    `run()` simulates until every request has finished and returns a `SimulationResult`. The same
    config gives byte-identical results (all randomness is seeded by the workload). `cost_model`
    overrides the one the config names (tests use a constant one); `on_step(replica, output)`
    sees every scheduler output. `deferred_decodes` (default on) lets the schedulers keep steady
    decodes in bulk (`sagellm.core.steady`): the same decisions and results, faster; off, they run
    the plain per-request loop (benchmarks compare the two). `speed` (simulated seconds -> step-time
    multiplier, e.g. the machine's `SpeedTrace` during a live run) scales every step's compute time
    by the machine's speed when it starts.
    """

    def __init__(self, config: SimulationConfig, cost_model: CostModel | None = None,
                 on_step: Callable[[int, SchedulerOutput], None] | None = None,
                 deferred_decodes: bool = True, speed: Callable[[float], float] | None = None) -> None:
        self.config = config
        cfg = config.sagellm
        self.shape = resolve_shape(config.model, cfg, config.base_dir)
        if cost_model is None:
            cost_model, spec = build_cost_model(config.hardware, self.shape, cfg, config.base_dir)
        else:
            spec = None
        self.cost_model = cost_model
        self.num_blocks = kv_num_blocks(self.shape, cfg, spec, config.memory_utilization)
        self.env = simpy.Environment()
        self.collector = MetricsCollector(config.kv_sample_interval)
        layerwise = cfg.kv_cache.granularity == KVGranularity.LAYER.value
        block_bytes = kv_block_bytes(self.shape, cfg)

        def replica(i: int, role: InferenceMode | None = None) -> Replica:
            return Replica(self.env, i, build_scheduler(self.shape, cfg, self.num_blocks, role, deferred_decodes),
                           PredictedExecutor(cost_model, block_bytes=block_bytes,
                                             layerwise_layers=self.shape.num_layers if layerwise else 0,
                                             speed=speed),
                           self.collector, None if on_step is None else (lambda out, i=i: on_step(i, out)))

        self.strict: StrictCluster | None = None
        if cfg.scheduler.schedule_mode is ScheduleMode.STRICT:
            if config.cluster.num_replicas != 1:
                raise ConfigError("cluster.num_replicas: mode strict sizes its cluster with scheduler.prefill_workers "
                                  "and scheduler.decode_workers; leave num_replicas at 1")
            n_p, n_d = cfg.scheduler.prefill_workers, cfg.scheduler.decode_workers
            self.strict = StrictCluster(
                self.env, [replica(i, InferenceMode.PREFILL_ONLY) for i in range(n_p)],
                [replica(n_p + i, InferenceMode.DECODE_ONLY) for i in range(n_d)], cost_model, block_bytes,
                cfg.kv_cache.block_size, self.shape.num_layers if layerwise else 0, self.collector)
            self.replicas = self.strict.replicas
        else:
            kv = cfg.kv_cache
            self.view = ClusterView(config.cluster.make_router(), config.cluster.num_replicas, kv.block_size,
                                    self.num_blocks, kv.enable_prefix_caching, kv.tenant_isolation)
            self.replicas = [replica(i) for i in range(config.cluster.num_replicas)]
            if self.view.uses_state:
                for r in self.replicas:
                    r.on_state = self.view.report
        for r in self.replicas:
            r.on_reject = lambda req, exc, index=r.index: self._reject(req, exc, index)
        self.rejected: list[tuple[str, str]] = []
        # Start the workload now so that a bad trace file fails here, not inside the event loop.
        try:
            trace = generate(config.workload, config.base_dir)
            first = next(trace, None)
        except WorkloadError as exc:
            raise ConfigError(str(exc)) from exc
        if first is None:
            raise ConfigError("workload: produces no requests (check num_requests, duration and the trace)")
        self._trace = itertools.chain([first], trace)
        self._sampling: dict[int, SamplingParams] = {}
        self._num_arrived = 0

    def run(self, progress: bool = False) -> SimulationResult:
        # The cyclic garbage collector would rescan every live record and queued request over and
        # over as they pile up (a third of the run time at 50,000 requests); the run allocates no
        # cycles that need it, so it is paused and restored afterwards.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(progress)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _run(self, progress: bool) -> SimulationResult:
        started = time.perf_counter()
        arrivals = self.env.process(self._arrivals())
        bar = _progress_bar(progress, self.config.workload.num_requests)
        if bar is None:
            self.env.run()
        else:
            # Advance in slices of simulated time so the bar can follow finished requests. (SimPy
            # re-queues the slice's `until` event, so the queue alone never says "done".)
            with bar:
                while arrivals.is_alive or self._num_outstanding():
                    if not arrivals.is_alive and all(r.is_sleeping for r in self.replicas):
                        break  # nothing can happen any more (see Replica's guard)
                    self.env.run(until=self.env.now + 10.0)
                    bar.update(self.collector.num_records - bar.n)
        wall = time.perf_counter() - started
        records = self.collector.records
        unfinished = self._num_outstanding()
        summary = summarize(records, self.collector.inter_token_latencies, self.config.slo.to_slo())
        summary["num_rejected"] = len(self.rejected)
        summary["num_unfinished"] = unfinished
        summary["prefix_hit_rate"] = self.kv_stats()["hit_rate"]
        info = {
            "simulated_seconds": self.env.now,
            "num_steps": sum(r.num_steps for r in self.replicas),
            "replica_busy_seconds": [r.busy_time for r in self.replicas],
            "num_kv_blocks_per_replica": self.num_blocks,
            "block_size": self.config.sagellm.kv_cache.block_size,
            "cost_model": self.cost_model.name,
            "model": self.shape.name or self.shape.architecture,
            "rejected": self.rejected[:100],
            "kv": self.kv_stats(),
            "kv_transfer_seconds": sum(r.executor.transfer_seconds for r in self.replicas),
        }
        if self.strict is not None:
            info["handoff"] = handoff_summary(self.strict.handoff_seconds)
            summary["handoff_mean_s"] = info["handoff"]["mean_s"]
        return SimulationResult(self.config, records, self.collector.inter_token_latencies, self.collector.kv_usage,
                                summary, info, wall)

    def _num_outstanding(self) -> int:
        if self.strict is not None:
            return self.strict.num_outstanding
        return sum(r.num_outstanding for r in self.replicas)

    def kv_stats(self) -> dict[str, float | int]:
        """The KV runtime's counters (prefix hits, copies, evictions), summed over replicas."""
        total: dict[str, float | int] = {}
        for r in self.replicas:
            for key, value in r.scheduler.kv.stats.to_dict().items():
                total[key] = total.get(key, 0) + value
        q = total.get("query_blocks", 0)
        total["hit_rate"] = round(total.get("hit_blocks", 0) / q, 6) if q else 0.0
        return total

    def _arrivals(self) -> Generator[simpy.Event, None, None]:
        env = self.env
        vocab = self.shape.vocab_size
        replicas = self.replicas
        context = replicas[0].scheduler.max_model_len
        for index, tr in enumerate(self._trace):
            if tr.arrival_time > env.now:
                yield env.timeout(tr.arrival_time - env.now)
            if index % OUTSTANDING_CHECK_EVERY == 0:
                self._check_outstanding(index)
            if tr.prompt_len >= context:  # refused as the scheduler would, before building its token ids
                self.rejected.append((tr.request_id, f"request {tr.request_id!r}: prompt has {tr.prompt_len} "
                                      f"tokens but the context window is {context} tokens (prompt plus at least "
                                      "one new token)"))
                self.collector.add_rejected(tr.request_id, 0, tr.arrival_time, tr.prompt_len, env.now)
                continue
            req = self._request(tr, vocab, index)
            target = 0
            try:
                if self.strict is not None:
                    target = self.strict.submit(req)
                else:
                    target = self._route(req, tr.output_len)
                    replicas[target].submit(req)
            except ValueError as exc:
                self._reject(req, exc, target)

    def _route(self, req: Request, max_new_tokens: int) -> int:
        """The replica the router picks for `req`, as the live cluster's coordinator asks it (with
        one replica there is nothing to pick, as a single live engine has no router)."""
        if len(self.replicas) == 1:
            return 0
        route = route_request(req.request_id, req.prompt_token_ids, max_new_tokens, self.view.block_size,
                              req.tenant, req.priority)
        try:
            return self.view.route(route, req.prompt_token_ids, [r.num_outstanding for r in self.replicas],
                                   None, self.env.now)
        except PolicyError as exc:
            raise ConfigError(str(exc)) from None

    def _reject(self, req: Request, exc: ValueError, replica: int) -> None:
        """A request the scheduler refused: it ends now with an error, recorded as rejected."""
        req.status = RequestStatus.FINISHED_ERROR
        req.finish_time = self.env.now
        if self.strict is not None and req.request_id in self.strict.coordinator.assigned:
            self.strict.coordinator.complete(req.request_id)  # its workers' load is released
        self.rejected.append((req.request_id, str(exc)))
        self.collector.add(req, replica)

    def _check_outstanding(self, num_arrived: int) -> None:
        """ConfigError once the prompts waiting or running in the replicas exceed
        MAX_OUTSTANDING_TOKENS: the offered load is so far beyond what the cluster serves that the
        queue would grow until memory runs out."""
        tokens = sum(r.num_prompt_tokens for replica in self.replicas for r in replica.held_requests())
        if tokens > MAX_OUTSTANDING_TOKENS:
            raise ConfigError(
                f"workload: after {num_arrived} arrivals, {tokens} prompt tokens are queued or running at "
                f"t={self.env.now:.1f} s (at most {MAX_OUTSTANDING_TOKENS} are simulated); the offered load far "
                "exceeds what the cluster serves: lower workload.arrival.rate or num_requests, or add replicas")

    def _request(self, tr: TraceRequest, vocab: int, index: int) -> Request:
        sampling = self._sampling.get(tr.output_len)
        if sampling is None:
            sampling = self._sampling[tr.output_len] = SamplingParams(max_new_tokens=tr.output_len, ignore_eos=True)
        return Request(tr.request_id, prompt_token_ids(tr, vocab, index), sampling, tr.arrival_time,
                       tenant=tr.tenant, priority=tr.priority)


def _progress_bar(enabled: bool, total: int | None) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="req", desc="simulating", mininterval=0.5)
