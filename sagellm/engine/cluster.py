"""`ClusterEngine`: several engine worker processes behind one coordinator.

Two shapes: `num_replicas` standard workers behind a router (HYBRID or TIME_SHARE on each), or a
STRICT cluster of `scheduler.prefill_workers` prefill-only and `scheduler.decode_workers`
decode-only workers, where `sagellm.core.pd.PDCoordinator` picks each request's pair and the KV
goes from one to the other over shared memory (`sagellm.engine.pd_transport`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sagellm.config import ConfigError, SageLLMConfig
from sagellm.core.pd import NoWorkerError, PDCoordinator, ScheduleMode
from sagellm.core.policies import ClusterView, PolicyError, make_router
from sagellm.core.policies.routing import RouteRequest, route_request
from sagellm.engine.cluster_worker import worker_main
from sagellm.engine.types import (
    GenerateOutput,
    GenerateRequest,
    StepTiming,
    coerce_request,
    collect_outputs,
    rejected_output,
)
from sagellm.metrics import handoff_summary

log = logging.getLogger(__name__)

# Each worker is a process that loads the model; more than this on one machine is a typo.
MAX_LIVE_WORKERS = 64


@dataclass
class _Tracked:
    request: GenerateRequest
    on_done: Callable[[GenerateOutput], None]
    worker: int  # the worker that has it now
    stage: str = "prefill"  # "prefill" or "decode" (STRICT), "serve" (replicas)
    attempts: int = 1


@dataclass
class _Worker:
    index: int
    role: str
    process: Any
    commands: Any
    alive: bool = True
    info: dict[str, Any] = field(default_factory=dict)


class ClusterEngine:
    """Serves requests on worker processes (one `SageLLMEngine` each), with the engine's API.

    Contract: `initialize()` spawns the workers and waits until each has loaded the model
    (RuntimeError naming the worker if one fails). `generate`, `generate_batch` and
    `generate_async` behave as `SageLLMEngine`'s (no streaming); a rejected request comes back
    with finish_reason "error". A coordinator thread receives the workers' events and watches
    their processes: when a worker dies, each request it held ends with finish_reason "error"
    and a message naming the worker and its exit code, or, with
    `scheduler.retry_on_worker_failure`, runs again on the live workers; the cluster keeps
    serving on the others (a kind of worker with none left fails new requests).
    `get_stats()` merges the workers' stats and adds the measured KV hand-off times (STRICT).
    Replicas are picked by `router` (a registered name or 'package.module:Class', built with
    `router_args`) through the same `ClusterView` the simulator routes with; text prompts are
    placed by their UTF-8 bytes (about 4 per token) as the coordinator does not tokenize.
    `shutdown()` stops the workers and ends unfinished requests with "abort".
    """

    def __init__(self, config: SageLLMConfig | None = None, num_replicas: int = 1,
                 router: str = "least_outstanding", start_timeout_s: float = 900.0,
                 router_args: dict[str, Any] | None = None) -> None:
        self.config = config or SageLLMConfig()
        sched = self.config.scheduler
        self.strict = sched.schedule_mode is ScheduleMode.STRICT
        if self.strict:
            self.roles = ["prefill_only"] * sched.prefill_workers + ["decode_only"] * sched.decode_workers
        else:
            if num_replicas <= 0:
                raise ValueError(f"num_replicas: must be > 0, got {num_replicas}")
            self.roles = ["standard"] * num_replicas
        if len(self.roles) > MAX_LIVE_WORKERS:
            raise ConfigError(f"{'scheduler.prefill_workers + decode_workers' if self.strict else 'num_replicas'}: "
                              f"{len(self.roles)} worker processes, more than {MAX_LIVE_WORKERS} (each loads a model)")
        try:
            self.router = None if self.strict else make_router(router, router_args, "cluster.router")
        except PolicyError as exc:
            raise ConfigError(str(exc)) from None
        self.view: ClusterView | None = None  # built once the workers report their KV capacity
        self.coordinator = PDCoordinator(sched.prefill_workers, sched.decode_workers) if self.strict else None
        self.retry = sched.retry_on_worker_failure
        self._n_prefill = self.roles.count("prefill_only")
        self.start_timeout_s = start_timeout_s
        self.workers: list[_Worker] = []
        self.handoff_seconds: list[float] = []  # each measured hand-off, with its size
        self.handoff_bytes: list[int] = []
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.RLock()
        self._replies: queue.Queue = queue.Queue()
        self._broadcast_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.vocab_size = 0
        self.max_model_len = 0

    # ---- lifecycle -------------------------------------------------------------------------
    def initialize(self) -> ClusterEngine:
        if self._thread is not None:
            return self
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("spawn")
        self._events = ctx.Queue()
        n_prefill = self.roles.count("prefill_only")
        inboxes = {i: ctx.Queue() for i, role in enumerate(self.roles) if role == "decode_only"}
        outboxes = {i - n_prefill: q for i, q in inboxes.items()}  # decode worker index -> its queue
        config = self.config.to_dict()
        report_state = bool(getattr(self.router, "uses_replica_state", False))
        for i, role in enumerate(self.roles):
            commands = ctx.Queue()
            proc = ctx.Process(target=worker_main, name=f"sagellm-worker-{i}-{role}", daemon=True,
                               args=(i, role, config, commands, self._events, inboxes.get(i),
                                     outboxes if role == "prefill_only" else {}, i, report_state))
            proc.start()
            self.workers.append(_Worker(i, role, proc, commands))
        try:
            self._wait_ready()
        except BaseException:
            self._kill_all()
            raise
        self.vocab_size = self.workers[0].info["vocab_size"]
        self.max_model_len = min(w.info["max_model_len"] for w in self.workers)
        if self.router is not None:
            kv = self.config.kv_cache
            self.view = ClusterView(self.router, len(self.workers), kv.block_size,
                                    min(w.info["num_device_blocks"] for w in self.workers),
                                    kv.enable_prefix_caching, kv.tenant_isolation)
        self._thread = threading.Thread(target=self._run, name="sagellm-cluster", daemon=True)
        self._thread.start()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        pending = {w.index for w in self.workers}
        while pending:
            try:
                event = self._events.get(timeout=1.0)
            except queue.Empty:
                event = None
            if event is None:
                for w in self.workers:
                    if w.index in pending and not w.process.is_alive():
                        raise RuntimeError(f"worker {w.index} ({w.role}) exited with code {w.process.exitcode} "
                                           "while loading the model")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"workers {sorted(pending)} did not start within {self.start_timeout_s:.0f} s")
                continue
            if event[0] == "fatal":
                raise RuntimeError(event[2])
            if event[0] == "ready":
                self.workers[event[1]].info = event[2]
                pending.discard(event[1])

    def shutdown(self) -> None:
        if self._thread is None:
            return
        with self._lock:  # a submission either is tracked before this (and answered below) or is refused
            self._stopping = True
        self._thread.join(timeout=10.0)
        self._thread = None
        for w in self.workers:
            if w.alive:
                w.commands.put(("stop",))
        for w in self.workers:
            w.process.join(timeout=20.0)
        self._kill_all()
        for q in [w.commands for w in self.workers] + [self._events]:
            q.cancel_join_thread()  # a dead reader must not block this process's exit
            q.close()
        with self._lock:
            tracked, self._tracked = self._tracked, {}
        for t in tracked.values():
            _deliver(t.on_done, rejected_output(t.request, "engine shut down", "abort"))

    def _kill_all(self) -> None:
        for w in self.workers:
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5.0)

    def __enter__(self) -> ClusterEngine:
        return self.initialize()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- public API ------------------------------------------------------------------------
    def generate(self, request: GenerateRequest | str, **kwargs: Any) -> GenerateOutput:
        return self.generate_batch([coerce_request(request, kwargs)])[0]

    def generate_batch(self, requests: list[GenerateRequest | str], **kwargs: Any) -> list[GenerateOutput]:
        reqs = [coerce_request(r, kwargs) for r in requests]
        ids = [r.request_id for r in reqs]
        if len(set(ids)) != len(ids):
            raise ValueError("request_id: the same id appears more than once in the batch")
        done: queue.Queue = queue.Queue()
        for r in reqs:
            self._submit(r, done.put)
        return collect_outputs(done, ids, self._check_alive)

    async def generate_async(self, request: GenerateRequest | str, **kwargs: Any) -> GenerateOutput:
        req = coerce_request(request, kwargs)
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def done(out: GenerateOutput) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(lambda: future.done() or future.set_result(out))

        self._submit(req, done)
        return await future

    def reset_prefix_cache(self) -> None:
        self._broadcast("reset_cache")

    def probe(self) -> list:
        """The speed probe (`sagellm.engine.calibration.speed_probe`) on every live worker at once."""
        return [s for samples in self._broadcast("probe", timeout=600.0) for s in samples]

    def start_step_log(self) -> None:
        """Every live worker records its following steps (`SageLLMEngine.start_step_log`)."""
        self._broadcast("start_step_log")

    def take_step_log(self) -> list[StepTiming]:
        """The steps every live worker recorded since `start_step_log`, each tagged with its worker
        index, in order of their end times; the workers stop recording."""
        steps = [s for log in self._broadcast("take_step_log") for s in log]
        return sorted(steps, key=lambda s: s.end_time)

    def get_stats(self) -> dict[str, Any]:
        workers = self._broadcast("stats")
        kv: dict[str, float] = {}
        for st in workers:
            for key, value in st["kv"].items():
                kv[key] = kv.get(key, 0) + value
        q = kv.get("query_blocks", 0)
        kv["hit_rate"] = round(kv.get("hit_blocks", 0) / q, 6) if q else 0.0
        return {"mode": self.config.scheduler.schedule_mode.value, "roles": list(self.roles),
                "dead_workers": [w.index for w in self.workers if not w.alive], "workers": workers, "kv": kv,
                "handoff": handoff_summary(self.handoff_seconds),
                "output_tokens": sum(s["output_tokens"] for s in workers),
                "num_preemptions": sum(s["num_preemptions"] for s in workers)}

    # ---- coordinator -------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the cluster is not running: call initialize() first")

    def _submit(self, req: GenerateRequest, on_done: Callable[[GenerateOutput], None]) -> None:
        self._check_alive()
        with self._lock:
            if self._stopping:
                raise RuntimeError("the cluster is shutting down")
            if req.request_id in self._tracked:
                _deliver(on_done, rejected_output(req, f"request_id {req.request_id!r} is already in flight"))
                return
            try:
                worker, decode = self._route(req)
            except NoWorkerError as exc:
                _deliver(on_done, rejected_output(req, f"no worker can serve it: {exc}"))
                return
            self._tracked[req.request_id] = _Tracked(req, on_done, worker, "prefill" if self.strict else "serve")
            self.workers[worker].commands.put(("add", req, decode))

    def _route(self, req: GenerateRequest) -> tuple[int, int | None]:
        if self.strict:
            p, d = self.coordinator.assign(req.request_id)
            return p, d
        alive = [w.alive for w in self.workers]
        if not any(alive):
            raise NoWorkerError("every worker has died")
        counts = [0] * len(self.workers)
        for t in self._tracked.values():
            counts[t.worker] += 1
        route, ids = _route_request(req, self.config.kv_cache.block_size)
        return self.view.route(route, ids, counts, alive, time.monotonic()), None

    def _run(self) -> None:
        while not self._stopping:
            try:
                event = self._events.get(timeout=0.1)
            except queue.Empty:
                event = None
            except (EOFError, OSError):
                return
            try:
                if event is not None:
                    self._handle(event)
                for w in self.workers:
                    if w.alive and not w.process.is_alive():
                        self._worker_died(w, f"exited with code {w.process.exitcode}")
            except Exception:
                log.exception("cluster coordinator: event %r failed", None if event is None else event[:2])

    def _handle(self, event: tuple) -> None:
        kind, index = event[0], event[1]
        if kind == "done":
            out: GenerateOutput = event[2]
            with self._lock:
                t = self._tracked.get(out.request_id)
                if t is None or index not in (t.worker, self._decode_worker_of(out.request_id)):
                    return  # a request already failed over or finished
                if out.finish_reason == "prefilled":
                    t.stage = "decode"
                    t.worker = self._n_prefill + self.coordinator.assigned[out.request_id][1]
                    return
                del self._tracked[out.request_id]
                if self.coordinator is not None:
                    self.coordinator.complete(out.request_id)
            if out.record is not None:  # the worker that finished it, as the simulator's records name it
                out = dataclasses.replace(out, record=dataclasses.replace(out.record, replica=index))
            _deliver(t.on_done, out)
        elif kind == "state":
            with self._lock:
                self.view.report(index, event[2])
        elif kind == "handoff":
            self.handoff_seconds.append(event[3])
            self.handoff_bytes.append(event[4])
        elif kind == "reply":
            self._replies.put((index, event[2], event[3]))
        elif kind == "fatal":
            log.error("%s", event[2])
            w = self.workers[index]
            if w.alive:
                w.process.kill()
                self._worker_died(w, event[2])

    def _decode_worker_of(self, rid: str) -> int | None:
        """The worker index of a STRICT request's decode worker (its output may overtake the prefill
        worker's "prefilled" event), None otherwise."""
        if self.coordinator is None or rid not in self.coordinator.assigned:
            return None
        return self._n_prefill + self.coordinator.assigned[rid][1]

    def _worker_died(self, w: _Worker, why: str) -> None:
        w.alive = False
        message = f"worker {w.index} ({w.role}, pid {w.process.pid}) died: {why}"
        log.error("%s", message)
        with self._lock:
            if w.role == "decode_only":
                d = w.index - self._n_prefill
                self.coordinator.fail_decode_worker(d)
                for other in self.workers:
                    if other.role == "prefill_only" and other.alive:
                        other.commands.put(("decode_dead", d))
            elif w.role == "prefill_only":
                self.coordinator.fail_prefill_worker(w.index)
            lost = [(rid, t) for rid, t in self._tracked.items() if self._held_by(t, rid, w)]
            for rid, t in lost:
                self._fail_over(rid, t, message)

    def _held_by(self, t: _Tracked, rid: str, w: _Worker) -> bool:
        if t.worker == w.index:
            return True
        if w.role == "decode_only" and t.stage == "prefill":  # its KV was bound for the dead worker
            d = w.index - self._n_prefill
            return self.coordinator.assigned.get(rid, (None, None))[1] == d
        return False

    def _fail_over(self, rid: str, t: _Tracked, message: str) -> None:
        if self.retry:
            try:
                if self.strict and t.stage == "prefill" and self.workers[t.worker].alive:
                    # still being prefilled: only its destination changes
                    d = self.coordinator.redirect(rid)
                    self.workers[t.worker].commands.put(("redirect", rid, d))
                    return
                if self.coordinator is not None:
                    self.coordinator.complete(rid)
                worker, decode = self._route(t.request)
            except NoWorkerError:
                pass
            else:
                t.worker, t.attempts = worker, t.attempts + 1
                t.stage = "prefill" if self.strict else "serve"
                self.workers[worker].commands.put(("add", t.request, decode))
                return
        del self._tracked[rid]
        if self.coordinator is not None:
            self.coordinator.complete(rid)
        _deliver(t.on_done, rejected_output(t.request, message))

    def _broadcast(self, kind: str, timeout: float = 120.0) -> list[Any]:
        """Send a command to every live worker and collect their replies (in worker order)."""
        self._check_alive()
        with self._broadcast_lock:
            targets = [w for w in self.workers if w.alive]
            for w in targets:
                w.commands.put((kind,))
            replies: dict[int, Any] = {}
            deadline = time.monotonic() + timeout
            while any(w.alive and w.index not in replies for w in targets):
                try:
                    index, k, value = self._replies.get(timeout=0.5)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"workers did not answer {kind!r} within {timeout:.0f} s") from None
                    continue
                if k == kind:
                    replies[index] = value
            return [replies[i] for i in sorted(replies)]


def _route_request(req: GenerateRequest, block_size: int) -> tuple[RouteRequest, tuple[int, ...]]:
    """What the router sees of `req`, and the ids its prefix index hashes: the prompt's token ids,
    or for text and chat prompts (tokenized by the worker) their UTF-8 bytes packed 4 to an id,
    about one id per token."""
    ids = req.prompt_token_ids
    if ids is None:
        text = req.prompt if req.prompt is not None else repr(req.messages)
        data = text.encode("utf-8", "surrogatepass")
        ids = tuple(int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4))
    return route_request(req.request_id, ids, req.max_new_tokens, block_size, req.tenant, req.priority), ids


def _deliver(callback: Callable[[GenerateOutput], None], out: GenerateOutput) -> None:
    try:
        callback(out)
    except Exception:
        log.debug("dropping a result for a caller that has gone away", exc_info=True)
