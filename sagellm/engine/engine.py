"""`SageLLMEngine`: the live engine. One background loop serves every caller with continuous batching."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sagellm.backends import device_info, resolve_device
from sagellm.config import SageLLMConfig
from sagellm.core.kv.manager import KVCacheManager
from sagellm.core.kv.tiers import KVGranularity
from sagellm.core.loop import ServingStep, StepFailed
from sagellm.core.pd import ScheduleMode
from sagellm.core.policies.routing import ReplicaState, replica_state
from sagellm.core.request import Request, RequestStatus
from sagellm.core.scheduler import Scheduler
from sagellm.engine.executor import LiveExecutor
from sagellm.engine.kv_sizing import check_kv_fits
from sagellm.engine.kv_tiers import KVTransferExecutor
from sagellm.engine.model_runner import ModelRunner
from sagellm.engine.pd_transport import HandoffMeta
from sagellm.engine.types import (
    GenerateOutput,
    GenerateRequest,
    RequestMetrics,
    StepTiming,
    StreamDelta,
    coerce_request,
    collect_outputs,
)
from sagellm.errors import RequestError, show
from sagellm.graph.batch import BatchShape
from sagellm.metrics.records import RequestRecord
from sagellm.models.attention import PagedKVCache
from sagellm.models.llama import LlamaModel
from sagellm.models.loader import load_model_weights
from sagellm.models.paths import resolve_model_path
from sagellm.models.tokenizer import load_tokenizer
from sagellm.models.weight_cache import tokenizer_cache_dir

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Pending:
    request: GenerateRequest
    prompt_ids: tuple[int, ...]
    on_done: Callable[[GenerateOutput], None]
    on_delta: Callable[[StreamDelta], None] | None = None
    emitted_text: list[str] = field(default_factory=list)


class SageLLMEngine:
    """Serves a model with a paged KV cache and continuous batching.

    Contract: `initialize()` loads the model and starts one background thread that runs the loop
    schedule -> execute -> update; `generate`, `generate_batch`, `generate_async` and
    `generate_stream` all submit to that loop, so concurrent callers share batches. Invalid
    requests raise `RequestError` (a ValueError) in the caller before anything is queued. A failing step ends the
    requests in it with finish_reason "error" and the loop keeps serving. `shutdown()` stops the
    loop and ends unfinished requests with "abort".
    """

    def __init__(self, config: SageLLMConfig | None = None) -> None:
        self.config = config or SageLLMConfig()
        self._inbox: queue.Queue = queue.Queue()
        self._pending: dict[str, _Pending] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = False  # guarded by _submit_lock: work is queued only while it is True
        self._failure: str | None = None  # why the loop died, if it did
        self._submit_lock = threading.Lock()
        self._lock = threading.Lock()
        self._stats = {"steps": 0, "prompt_tokens": 0, "output_tokens": 0, "finished": 0, "errors": 0,
                       "busy_s": 0.0}
        self._started_at = 0.0
        self._step_log: list[StepTiming] | None = None
        self.worker_index = 0  # this engine's index among the prefill workers of a cluster
        # Set by a cluster worker whose router reads replica state: called after every step.
        self.on_state: Callable[[ReplicaState], None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def initialize(self) -> SageLLMEngine:
        if self._thread is not None:
            return self
        cfg = self.config
        if cfg.scheduler.schedule_mode is ScheduleMode.STRICT:
            raise ValueError("scheduler.mode: strict runs prefill and decode workers as separate processes; "
                             "serve it with sagellm.engine.ClusterEngine (or sagellm.engine.create_engine)")
        if cfg.backend.num_threads:
            torch.set_num_threads(cfg.backend.num_threads)
        self.device = resolve_device(cfg.backend.device)
        self.dtype = TORCH_DTYPES[cfg.model.dtype]
        self.model_path = resolve_model_path(cfg.model.model_id)
        shape, weights = load_model_weights(self.model_path, self.dtype)
        self.tokenizer = load_tokenizer(self.model_path, shape.eos_token_ids, cache_dir=tokenizer_cache_dir())
        self.shape = shape
        self.max_model_len = min(cfg.model.max_model_len or shape.max_position_embeddings,
                                 shape.max_position_embeddings)
        block_size = cfg.kv_cache.block_size
        block_bytes = block_size * shape.kv_bytes_per_token(self.dtype.itemsize)
        num_blocks = cfg.kv_cache.device_blocks(block_bytes)
        policy = cfg.kv_cache.policy(block_bytes)
        check_kv_fits(self.device, block_bytes, num_blocks, policy.ddr_blocks, policy.nvme_blocks,
                      cfg.kv_cache.nvme_path, "num_blocks" if cfg.kv_cache.num_blocks else "memory_gb")
        self.model = LlamaModel(shape, weights, self.dtype, self.device, self.max_model_len,
                                pack_weights=cfg.backend.kernels)
        del weights
        self.kv_cache = PagedKVCache(shape.num_layers, shape.num_kv_heads, num_blocks, block_size,
                                     shape.head_dim, self.dtype, self.device)
        self.kv_manager = KVCacheManager(num_blocks, block_size, policy)
        self.kv_transfers = KVTransferExecutor(self.kv_cache, policy.ddr_blocks, policy.nvme_blocks,
                                               cfg.kv_cache.nvme_path)
        # A request alone must fit in the KV pool; the scheduler applies the same cap.
        self.max_model_len = min(self.max_model_len, self.kv_manager.capacity_tokens)
        self.scheduler = Scheduler(self.kv_manager, cfg.scheduler.limits(self.max_model_len),
                                   policy=cfg.scheduler.make_policy())
        self.executor = LiveExecutor(
            ModelRunner(self.model, self.kv_cache, use_kernels=cfg.backend.kernels), self.tokenizer, cfg.backend.seed,
            self.kv_transfers, layerwise=policy.granularity is KVGranularity.LAYER,
        )
        self.eos_token_ids = tuple(sorted(set(self.tokenizer.eos_token_ids) | set(shape.eos_token_ids)))
        self._stopping = False
        self._accepting = True
        self._failure = None
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="sagellm-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def vocab_size(self) -> int:
        return self.shape.vocab_size

    def shutdown(self) -> None:
        if self._thread is None:
            return
        with self._submit_lock:  # every message queued before "stop" is handled; none after it
            self._accepting = False
            self._inbox.put(("stop", None))
        self._thread.join()
        self._thread = None
        self.kv_transfers.close()

    def __enter__(self) -> SageLLMEngine:
        return self.initialize()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- public API ------------------------------------------------------------------------
    def generate(self, request: GenerateRequest | str, **kwargs: Any) -> GenerateOutput:
        return self.generate_batch([self._coerce(request, kwargs)])[0]

    def generate_batch(self, requests: list[GenerateRequest | str], **kwargs: Any) -> list[GenerateOutput]:
        reqs = [self._coerce(r, kwargs) for r in requests]
        prepared = [self._prepare(r) for r in reqs]
        self._check_unique([r.request_id for r in reqs])
        done: queue.Queue = queue.Queue()
        # One message for the whole batch: the loop admits all of it before its next step.
        self._post("add_many", ([_Pending(r, ids, done.put) for r, ids in prepared], time.monotonic()))
        return collect_outputs(done, [r.request_id for r in reqs], self._check_alive)

    async def generate_async(self, request: GenerateRequest | str, **kwargs: Any) -> GenerateOutput:
        req = self._coerce(request, kwargs)
        r, ids = self._prepare(req)
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def done(out: GenerateOutput) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(lambda: future.done() or future.set_result(out))

        pending = _Pending(r, ids, done)
        self._submit(pending)
        try:
            return await future
        except asyncio.CancelledError:
            self._abort_own(pending)
            raise

    def generate_stream(self, request: GenerateRequest | str, **kwargs: Any) -> TokenStream:
        """A stream of `StreamDelta`s; iterate it with `for` or `async for`."""
        req = self._coerce(request, kwargs)
        r, ids = self._prepare(req)
        return TokenStream(self, r, ids)

    def abort(self, request_id: str) -> None:
        """End the in-flight request `request_id`, whoever submitted it (finish reason "abort")."""
        self._inbox.put(("abort", request_id))

    def _abort_own(self, pending: _Pending) -> None:
        """End the request of this submission only: if its id was rejected (a duplicate of another
        caller's in-flight request) or has finished and been reused, nothing else is touched."""
        self._inbox.put(("abort_own", pending))

    # ---- prefill/decode workers (inference_mode prefill_only / decode_only) -------------------
    def set_handoff(self, sender: Any) -> None:
        """On a prefill-only engine: export each handed-off request's KV through `sender` (a
        `sagellm.engine.pd_transport.HandoffSender`); call before serving."""
        self.executor.handoff = sender

    def submit(self, request: GenerateRequest, on_done: Callable[[GenerateOutput], None]) -> None:
        """Queue `request`; `on_done` gets its output from the engine thread (a worker's path).
        ValueError, before anything is queued, if the request is invalid."""
        req, ids = self._prepare(request)
        self._submit(_Pending(req, ids, on_done))

    def submit_prefilled(self, meta: Any, kv: torch.Tensor, on_done: Callable[[GenerateOutput], None]) -> None:
        """On a decode-only engine: continue a request prefilled elsewhere (`meta`, a `HandoffMeta`)
        whose prompt KV is `kv` (`[layers, 2, blocks, block_size, kv_heads, head_dim]`); `on_done`
        gets its output. The output's token ids include the first token sampled by the prefill worker."""
        self._post("add_prefilled", (_Pending(meta.request, meta.prompt_ids, on_done), meta, kv))

    def reset_prefix_cache(self, timeout: float = 60.0) -> None:
        """Forget all cached KV blocks in every tier and zero the KV stats, once no request is in
        flight (waits up to `timeout` seconds for that; RuntimeError if it does not happen)."""
        self._check_alive()
        deadline = time.monotonic() + timeout
        while True:
            done: queue.Queue = queue.Queue()
            request = {"reply": done.put, "cancelled": False}
            self._post("reset_cache", request)
            try:
                if done.get(timeout=max(0.0, deadline - time.monotonic()) + 1.0):
                    return
            except queue.Empty:
                request["cancelled"] = True  # the loop must not act on it later
                raise RuntimeError("reset_prefix_cache: the engine loop did not answer in time") from None
            if time.monotonic() > deadline:
                raise RuntimeError("reset_prefix_cache: requests are still in flight")
            time.sleep(0.05)

    def probe(self) -> list:
        """Time the speed probe's steps on this idle engine (`sagellm.engine.calibration.speed_probe`)
        and return them. Side effect: the probe writes scratch K/V into pool blocks, so the prefix
        cache is reset afterwards."""
        from sagellm.engine.calibration import speed_probe

        samples = speed_probe(self)
        self.reset_prefix_cache()
        return samples

    def start_step_log(self) -> None:
        """Record every following step's batch shape and executor time (`take_step_log` returns
        them). Costs one small object per step; off by default."""
        with self._lock:
            self._step_log = []

    def take_step_log(self) -> list[StepTiming]:
        """The steps recorded since `start_step_log` (oldest first), and stop recording."""
        with self._lock:
            log, self._step_log = self._step_log or [], None
        return log

    def get_stats(self) -> dict[str, Any]:
        self._require_initialized()
        elapsed = max(time.monotonic() - self._started_at, 1e-9)
        kvm = self.kv_manager
        info = device_info(self.device)
        with self._lock:
            stats = dict(self._stats)
        stats.update(
            model=self.shape.name or str(self.model_path.name),
            model_path=str(self.model_path),
            dtype=self.config.model.dtype,
            backend=info.backend,
            device=info.device,
            device_name=info.name,
            num_threads=info.num_threads,
            max_model_len=self.max_model_len,
            kv_block_size=kvm.block_size,
            kv_num_blocks=kvm.num_blocks,
            kv_capacity_tokens=kvm.capacity_tokens,
            kv_free_blocks=kvm.num_free_blocks,
            kv_usage=kvm.usage,
            kv_cache_bytes=self.kv_cache.nbytes,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions,
            schedule_mode=self.config.scheduler.schedule_mode.value,
            role=self.config.scheduler.role.value,
            kv=kvm.stats.to_dict(),
            uptime_s=elapsed,
            output_tokens_per_s=stats["output_tokens"] / elapsed,
        )
        return stats

    # ---- request preparation (caller thread) -------------------------------------------------
    def _coerce(self, request: GenerateRequest | str, kwargs: dict[str, Any]) -> GenerateRequest:
        return coerce_request(request, kwargs)

    def _prepare(self, req: GenerateRequest) -> tuple[GenerateRequest, tuple[int, ...]]:
        self._require_initialized()
        if req.prompt is not None:
            ids = tuple(self.tokenizer.encode(req.prompt))
        elif req.messages is not None:
            try:
                ids = tuple(self.tokenizer.apply_chat_template(list(req.messages), add_generation_prompt=True))
            except RequestError:
                raise
            except Exception as exc:  # the template itself rejected the messages
                raise RequestError(f"messages: the chat template cannot render them: {show(str(exc))}") from exc
        else:
            ids = req.prompt_token_ids
            bad = [t for t in ids if t >= self.shape.vocab_size]
            if bad:
                raise RequestError(
                    f"prompt_token_ids: {bad[0]} is outside the vocabulary (size {self.shape.vocab_size})")
        if not ids:
            raise RequestError("prompt: tokenizes to zero tokens")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"prompt: {len(ids)} tokens is longer than the context window allows "
                f"(max_model_len {self.max_model_len}, which must leave room for one new token)"
            )
        return req, ids

    @staticmethod
    def _check_unique(ids: list[str]) -> None:
        """Ids within one call must differ; a clash with an in-flight request is reported by the
        scheduler as an "error" output for the newcomer."""
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise RequestError(f"request_id {dup!r} appears more than once in the batch")

    def _submit(self, pending: _Pending) -> None:
        self._post("add", (pending, time.monotonic()))

    def _post(self, kind: str, payload: Any) -> None:
        """Queue a message for the loop, or RuntimeError if the engine does not take work now. Under
        `_submit_lock`, so a message is either queued before the loop's last look at its inbox or
        refused: a caller racing `shutdown()` never waits forever."""
        with self._submit_lock:
            self._check_alive()
            self._inbox.put((kind, payload))

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"{self._failure}; see the log, then restart the engine")
        if self._thread is None or not self._accepting:
            raise RuntimeError("the engine is not running: call initialize() first")
        if not self._thread.is_alive():
            raise RuntimeError("the engine loop has stopped unexpectedly; see the log, then restart the engine")

    def _require_initialized(self) -> None:
        if self._thread is None:
            raise RuntimeError("the engine is not running (not initialized, or shut down): call initialize() first")

    # ---- the loop (engine thread) ------------------------------------------------------------
    def _loop(self) -> None:
        reason, status = "engine shut down", RequestStatus.FINISHED_ABORTED
        try:
            self._serve()
        except BaseException as exc:  # logged here; the thread ends and every caller is answered below
            log.exception("the engine loop failed")
            reason, status = f"the engine loop failed: {exc!r}", RequestStatus.FINISHED_ERROR
            self._failure = reason
        finally:
            self._close_out(reason, status)

    def _close_out(self, reason: str, status: RequestStatus) -> None:
        """Stop taking work, then end every request the loop holds or has queued with `reason`."""
        with self._submit_lock:
            self._accepting = False
        for rid in list(self._pending):
            try:
                self._fail_requests([rid], reason, status=status)
            except Exception:  # the scheduler itself may be what failed: answer the caller anyway
                self._deliver_error(self._pending.pop(rid), reason)
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind in ("add", "add_prefilled"):
                self._deliver_error(payload[0], reason)
            elif kind == "add_many":
                for pending in payload[0]:
                    self._deliver_error(pending, reason)
            elif kind == "reset_cache":
                payload["reply"](False)

    def _serve(self) -> None:
        while not self._stopping:
            self._drain_inbox(block=not self.scheduler.has_unfinished())
            if self._stopping or not self.scheduler.has_unfinished():
                continue
            try:
                step = ServingStep.start(self.scheduler, self.executor.execute, time.monotonic())
                if not isinstance(step, ServingStep):  # nothing to run (nothing fits now)
                    if step.preempted_ids or step.finished_ids:
                        self.executor.runner.update_tables(step)  # the runner forgets their blocks
                    continue
                finished = step.finish(time.monotonic())
            except StepFailed as failure:  # a failed step must not kill the loop or hang callers
                out, exc = failure.output, failure.__cause__
                log.error("step %d failed", out.step_id, exc_info=exc)
                self._distrust_kv_ops(out)
                self._fail_requests([s.request_id for s in out.scheduled], f"step failed: {exc!r}")
                continue
            out, result = step.output, step.result
            if not out.is_empty:
                with self._lock:
                    self._stats["busy_s"] += result.duration
                    if self._step_log is not None:
                        self._step_log.append(StepTiming(BatchShape.from_output(out), result.duration,
                                                         time.monotonic()))
                self._dispatch(out, finished)
                if self.on_state is not None:
                    self.on_state(replica_state(self.scheduler))

    def _distrust_kv_ops(self, out: Any) -> None:
        """After a failed step, nothing its KV operations wrote is trusted: the device blocks they
        filled lose their cached identity, and the lower-tier slots they wrote fail any later load
        (which then recomputes)."""
        dst_blocks = [op.dst_index for op in out.kv_ops if op.dst_tier == "hbm"]
        if dst_blocks:
            self.kv_manager.invalidate(dst_blocks)
        self.kv_transfers.distrust(out.kv_ops)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: tuple[str, Any]) -> None:
        kind, payload = item
        if kind == "stop":
            self._stopping = True
        elif kind == "abort" or (kind == "abort_own" and self._pending.get(payload.request.request_id) is payload):
            rid = payload if kind == "abort" else payload.request.request_id
            req = self.scheduler.abort_request(rid, time.monotonic())
            if req is not None:
                self._finish(req)
        elif kind == "add":
            self._add(*payload)
        elif kind == "reset_cache":
            if payload["cancelled"]:
                return
            ok = self.kv_manager.reset_cache()
            if ok:
                self.kv_transfers.run(self.kv_manager.take_ops())
            payload["reply"](ok)
        elif kind == "add_many":
            pendings, arrival = payload
            for pending in pendings:
                self._add(pending, arrival)
        elif kind == "add_prefilled":
            pending, meta, kv = payload
            self._add(pending, meta.arrival_time, meta, kv)

    def _add(self, pending: _Pending, arrival: float, handed: Any = None, kv: torch.Tensor | None = None) -> None:
        r = pending.request
        sampling = r.sampling_params()
        core_req = Request(r.request_id, list(pending.prompt_ids), sampling, arrival,
                           eos_token_ids=self.eos_token_ids, tenant=r.tenant, priority=r.priority)
        if handed is not None:  # prefilled by another worker: continue from its first token
            core_req.output_token_ids.append(handed.first_token)
            core_req.remote_kv_tokens = len(pending.prompt_ids)
            core_req.first_scheduled_time = handed.first_scheduled_time
            core_req.first_token_time = handed.first_token_time
            core_req.token_times.append(handed.first_token_time)
        try:
            self.scheduler.add_request(core_req)
        except ValueError as exc:
            self._deliver_error(pending, str(exc))
            return
        self._pending[r.request_id] = pending
        if kv is not None:
            self.kv_transfers.staging[r.request_id] = kv
        try:
            self.executor.register(r.request_id, sampling, stream=pending.on_delta is not None)
            if handed is not None:
                self.executor.feed(r.request_id, handed.first_token)
        except Exception as exc:
            log.exception("request %s could not be registered", r.request_id)
            self._fail_requests([r.request_id], f"request could not be started: {exc!r}")
            return
        with self._lock:
            self._stats["prompt_tokens"] += len(pending.prompt_ids)

    def _dispatch(self, out: Any, finished: list[Request]) -> None:
        done_ids = {r.request_id for r in finished}
        n_new = 0
        for s in out.scheduled:
            if not s.samples:
                continue
            n_new += 1
            p = self._pending.get(s.request_id)
            if p is None or p.on_delta is None or s.request_id in done_ids:
                continue
            state = self.executor.states[s.request_id]
            if state.pending_text or state.pending_tokens:
                p.emitted_text.append(state.pending_text)
                delta = StreamDelta(s.request_id, state.pending_text, tuple(state.pending_tokens))
                state.pending_text, state.pending_tokens = "", []
                if not _notify(p.on_delta, delta):
                    self._abort_own(p)  # the consumer is gone
        with self._lock:
            self._stats["steps"] += 1
            self._stats["output_tokens"] += n_new
        for req in finished:
            self._finish(req)

    def _finish(self, req: Request, error: str | None = None) -> None:
        pending = self._pending.pop(req.request_id, None)
        state = self.executor.release(req.request_id)
        self.kv_transfers.staging.pop(req.request_id, None)
        handoff = self.executor.handoff
        if handoff is not None:
            meta = None
            if pending is not None and req.status is RequestStatus.FINISHED_PREFILLED:
                meta = HandoffMeta(pending.request, pending.prompt_ids, req.output_token_ids[0], req.arrival_time,
                                   req.first_scheduled_time, req.first_token_time, self.worker_index)
            handoff.complete(req, meta)
        if pending is None:
            return
        detok = state.detokenizer if state else None
        if detok is not None and detok.stopped:
            text = detok.text
        else:
            text = self.tokenizer.decode(req.output_token_ids)
        output = GenerateOutput(
            request_id=req.request_id,
            text=text,
            token_ids=tuple(req.output_token_ids),
            finish_reason=req.finish_reason or "error",
            prompt_token_ids=pending.prompt_ids,
            metrics=RequestMetrics.from_request(req),
            error=error,
            record=RequestRecord.from_request(req),
        )
        with self._lock:
            self._stats["finished"] += 1
            self._stats["errors"] += error is not None
        if pending.on_delta is not None:
            sent = "".join(pending.emitted_text)
            tail = text[len(sent):] if text.startswith(sent) else ""
            tokens = tuple(state.pending_tokens) if state else ()
            _notify(pending.on_delta, StreamDelta(req.request_id, tail, tokens, finished=True, output=output))
        _notify(pending.on_done, output)

    def _deliver_error(self, pending: _Pending, message: str) -> None:
        r = pending.request
        with self._lock:
            self._stats["errors"] += 1
        output = GenerateOutput(r.request_id, "", (), "error", pending.prompt_ids, None, error=message)
        if pending.on_delta is not None:
            _notify(pending.on_delta, StreamDelta(r.request_id, "", (), finished=True, output=output))
        _notify(pending.on_done, output)

    def _fail_requests(self, request_ids: list[str], message: str,
                       status: RequestStatus = RequestStatus.FINISHED_ERROR) -> None:
        now = time.monotonic()
        for rid in request_ids:
            req = self.scheduler.abort_request(rid, now)
            if req is None:
                pending = self._pending.pop(rid, None)
                if pending is not None:  # it left the scheduler in the step that failed
                    self.executor.release(rid)
                    self._deliver_error(pending, message)
                continue
            req.status = status
            self._finish(req, error=message)


def _notify(callback: Callable[[Any], None], value: Any) -> bool:
    """Deliver to a caller's callback; a caller that has gone away (closed event loop) must not
    take the engine loop down. Returns False when delivery failed."""
    try:
        callback(value)
        return True
    except Exception:
        log.debug("dropping a result for a caller that has gone away", exc_info=True)
        return False


class TokenStream:
    """A lazily submitted streaming request: `for delta in stream` (blocking) or
    `async for delta in stream`. Leaving the loop early aborts the request."""

    def __init__(self, engine: SageLLMEngine, request: GenerateRequest, prompt_ids: tuple[int, ...]) -> None:
        self.engine = engine
        self.request = request
        self.prompt_ids = prompt_ids
        self.output: GenerateOutput | None = None
        self.finished = False
        self._pending: _Pending | None = None

    def __iter__(self) -> Iterator[StreamDelta]:
        q: queue.Queue = queue.Queue()
        self._pending = _Pending(self.request, self.prompt_ids, lambda _o: None, q.put)
        self.engine._submit(self._pending)
        try:
            while not self.finished:
                yield self._receive(q.get())
        finally:
            self._abort_if_unfinished()

    async def __aiter__(self) -> AsyncIterator[StreamDelta]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._pending = _Pending(self.request, self.prompt_ids, lambda _o: None,
                                 lambda d: loop.call_soon_threadsafe(q.put_nowait, d))
        self.engine._submit(self._pending)
        try:
            while not self.finished:
                yield self._receive(await q.get())
        finally:
            self._abort_if_unfinished()

    def _receive(self, delta: StreamDelta) -> StreamDelta:
        if delta.finished:
            self.finished = True
            self.output = delta.output
        return delta

    def _abort_if_unfinished(self) -> None:
        """A consumer that leaves the loop early ends its request."""
        if not self.finished and self._pending is not None:
            self.engine._abort_own(self._pending)
