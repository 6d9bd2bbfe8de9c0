"""Continuous-batching scheduler with chunked prefill and preemption by recompute (stdlib only).

There is no prefill or decode phase: each step every request gets some number of tokens to compute,
`num_tokens - num_computed_tokens` at most, within a per-step token budget. Running requests go
first in admission order (so decodes are never stalled by new prompts), then waiting requests are
admitted first-come first-served while the budget, `max_num_seqs` and the KV pool allow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sagellm.core.kv.manager import KVCacheManager
from sagellm.core.outputs import ScheduledRequest, SchedulerOutput, StepResult
from sagellm.core.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerLimits:
    """Per-step limits. `max_model_len` caps prompt plus output of one request."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked_prefill, max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len})"
            )


class Scheduler:
    """Decides, step by step, which tokens of which requests to compute.

    Contract: `add_request` queues a request (raises `ValueError` if it can never fit);
    `schedule(now)` returns the next `SchedulerOutput` and allocates its blocks; `update(output,
    result, now)` applies a step's sampled tokens, finishes requests and frees their blocks, and
    returns the requests that finished. `abort_request` removes a request at any time. The scheduler
    never reads a clock: `now` is always an argument.
    """

    def __init__(self, kv: KVCacheManager, limits: SchedulerLimits) -> None:
        self.kv = kv
        self.limits = limits
        # A request alone must always fit in the pool, so the oldest request can always progress.
        self.max_model_len = min(limits.max_model_len, kv.capacity_tokens)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_since_last_step: list[str] = []
        self._fresh_table: set[str] = set()
        self._step_id = 0
        self.num_preemptions = 0

    # ---- requests in and out -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in the scheduler")
        if request.num_tokens >= self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r}: prompt has {request.num_tokens} tokens but the "
                f"context window is {self.max_model_len} tokens (prompt plus at least one new token)"
            )
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str, now: float) -> Request | None:
        """Remove a request wherever it is; returns it (status FINISHED_ABORTED) or None if unknown."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._finish(req, RequestStatus.FINISHED_ABORTED, now)
        return req

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        budget = self.limits.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            new_blocks = self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n)
            while new_blocks is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
                new_blocks = self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n)
            if new_blocks is None:
                break
            scheduled.append(self._scheduled(req, n, new_blocks))
            budget -= n
            i += 1

        while (
            self.waiting
            and budget > 0
            and not preempted
            and len(self.running) < self.limits.max_num_seqs
        ):
            req = self.waiting[0]
            remaining = req.num_tokens - req.num_computed_tokens
            if not self.limits.chunked_prefill and remaining > budget:
                break
            n = min(remaining, budget)
            new_blocks = self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n)
            if new_blocks is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.running.append(req)
            scheduled.append(self._scheduled(req, n, new_blocks))
            budget -= n

        self._step_id += 1
        out = SchedulerOutput(
            step_id=self._step_id,
            scheduled=tuple(scheduled),
            preempted_ids=tuple(preempted),
            finished_ids=tuple(self._finished_since_last_step),
        )
        self._finished_since_last_step = []
        return out

    def update(self, output: SchedulerOutput, result: StepResult, now: float) -> list[Request]:
        """Apply one step's result; return the requests that finished in it."""
        finished: list[Request] = []
        stopped = set(result.stopped_ids)
        for s in output.scheduled:
            req = self.requests.get(s.request_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted or preempted after scheduling
            req.num_computed_tokens = s.start_position + s.num_tokens
            if not s.samples:
                continue
            token = result.sampled_token_ids.get(s.request_id)
            if token is None:
                raise ValueError(f"step {output.step_id}: no sampled token for {s.request_id!r}")
            req.output_token_ids.append(token)
            req.token_times.append(now)
            if req.first_token_time is None:
                req.first_token_time = now
            status = self._stop_status(req, token, s.request_id in stopped)
            if status is not None:
                self.running.remove(req)
                self._finish(req, status, now)
                finished.append(req)
        return finished

    # ---- internals -------------------------------------------------------------------------
    def _scheduled(self, req: Request, n: int, new_blocks: list[int]) -> ScheduledRequest:
        start = req.num_computed_tokens
        resets = req.request_id in self._fresh_table or start == 0
        self._fresh_table.discard(req.request_id)
        return ScheduledRequest(
            request_id=req.request_id,
            start_position=start,
            token_ids=req.token_slice(start, start + n),
            new_block_ids=tuple(new_blocks),
            resets_block_table=resets,
            samples=start + n == req.num_tokens,
        )

    def _stop_status(self, req: Request, token: int, stopped_by_executor: bool) -> RequestStatus | None:
        if stopped_by_executor:
            req.stop_reason = "stop_string"
            return RequestStatus.FINISHED_STOPPED
        if token in req.sampling.stop_token_ids:
            req.stop_reason = f"stop_token:{token}"
            return RequestStatus.FINISHED_STOPPED
        if not req.sampling.ignore_eos and token in req.eos_token_ids:
            req.stop_reason = f"eos:{token}"
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.sampling.max_new_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.max_model_len:
            req.stop_reason = "max_model_len"
            return RequestStatus.FINISHED_LENGTH
        return None

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._fresh_table.add(req.request_id)
        self.waiting.appendleft(req)

    def _finish(self, req: Request, status: RequestStatus, now: float) -> None:
        self.kv.free(req.request_id)
        self._fresh_table.discard(req.request_id)
        req.status = status
        req.finish_time = now
        del self.requests[req.request_id]
        self._finished_since_last_step.append(req.request_id)
