"""Continuous-batching scheduler with chunked prefill, prefix reuse and preemption (stdlib only).

In the HYBRID mode there is no prefill or decode phase: each step every request gets some number
of tokens to compute, `num_tokens - num_computed_tokens` at most, within a per-step token budget.
Running requests go first in admission order (decodes, then the one prompt a budget may have cut,
so decodes are never stalled by new prompts), then waiting requests are admitted first-come
first-served while the budget, `max_num_seqs`, `max_prefill_batch` and the KV pool allow, each
starting after its longest cached prefix when prefix caching is on. In TIME_SHARE a step holds
only prefill rows or only decode rows (see `sagellm.core.pd`). A preempted request is recomputed,
or swapped to DDR and back under `KVGranularity.REQUEST`. The KV manager's decisions (loads,
offloads, drops) leave in each step's `SchedulerOutput.kv_ops`.

Roles (`InferenceMode`): a PREFILL_ONLY scheduler ends each request once its first token is
sampled (status FINISHED_PREFILLED) and lists it in `handoff_ids`: the executor exports its KV. A
DECODE_ONLY scheduler admits requests that come with their first token and `remote_kv_tokens`:
it allocates their blocks and emits `receive` operations that fill them from the hand-off.

The scheduler is three modules: this one (requests in and out, `schedule`, the mechanics of blocks,
preemption and finishing), `step_building` (the rows of a step) and `step_update` (`update`).
"""

from __future__ import annotations

from bisect import insort
from collections import deque
from operator import add

from sagellm.core.kv.hashing import extend_block_hashes, root_hash
from sagellm.core.kv.manager import KVCacheManager
from sagellm.core.limits import SchedulerLimits
from sagellm.core.outputs import SchedulerOutput, StepResult, batch_totals, decode_totals
from sagellm.core.pd import InferenceMode
from sagellm.core.policies.scheduling import make_scheduling_policy
from sagellm.core.request import Request, RequestStatus
from sagellm.core.steady import SteadyDecodes, by_admission
from sagellm.core.step_building import StepBuilding
from sagellm.core.step_rows import Row
from sagellm.core.step_update import StepUpdate

__all__ = ["Scheduler", "SchedulerLimits"]


class Scheduler(StepBuilding, StepUpdate):
    """Decides, step by step, which tokens of which requests to compute.

    Contract: `add_request` queues a request (raises `ValueError` if it can never fit);
    `schedule(now)` returns the next `SchedulerOutput` and allocates its blocks; `update(output,
    result, now)` applies a step's sampled tokens, finishes requests and frees their blocks, and
    returns the requests that finished. `abort_request` removes a request at any time. The scheduler
    never reads a clock: `now` is always an argument.

    With `deferred_decodes` (the simulator sets it) requests in steady decode are kept in a
    `SteadyDecodes` set whose per-step state (`num_computed_tokens`, `output_token_ids`,
    `token_times`) is written only when the request leaves it: when it finishes, is aborted or
    preempted, or when `sync_request_state()` is called. Decisions and messages are identical
    either way; only reading a running request's state between steps needs the sync. It takes
    effect in the HYBRID mode of a standard worker without prefix caching, and is off otherwise.
    """

    def __init__(self, kv: KVCacheManager, limits: SchedulerLimits, deferred_decodes: bool = False,
                 policy: object = None) -> None:
        self.kv = kv
        self.limits = limits
        # The scheduling policy decides the order of admission and the preemption victim.
        self.policy = make_scheduling_policy("fcfs") if policy is None else policy
        self._fcfs = bool(getattr(self.policy, "keeps_arrival_order", False))
        self._hooks = bool(getattr(self.policy, "tracks_service", False))
        # A request alone must always fit in the pool, so the oldest request can always progress.
        self.max_model_len = min(limits.max_model_len, kv.capacity_tokens)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_since_last_step: list[str] = []
        self._failed_since_last_step: list[str] = []
        # Tokens each running request's blocks can hold, so most decodes skip the KV manager.
        self._slots: dict[str, int] = {}
        self._step_id = 0
        self.num_preemptions = 0
        self.caching = kv.caching
        self.swaps = kv.policy.swaps
        self._tiering = bool(kv.lower) and kv.caching
        self.prefill_only = limits.role is InferenceMode.PREFILL_ONLY
        self._max_prefill = limits.max_prefill_batch or limits.max_num_seqs
        self._max_decode = limits.max_decode_batch or limits.max_num_seqs
        self._decode_steps_since_prefill = 0
        self._admissions = 0
        self.steady: SteadyDecodes | None = None
        if (deferred_decodes and limits.role is InferenceMode.STANDARD and not limits.time_share
                and not kv.caching and self._fcfs and not self._hooks):
            self.steady = SteadyDecodes()
        # Deferred mode: running requests outside `steady`, in admission order, and what the last
        # `schedule` left for `update` (its output and the rows of requests outside `steady`).
        self._others: list[Request] = []
        self._pending: tuple[SchedulerOutput, list[Row]] | None = None

    # ---- requests in and out -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in the scheduler")
        if request.num_tokens >= self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r}: prompt has {request.num_tokens} tokens but the "
                f"context window is {self.max_model_len} tokens (prompt plus at least one new token)"
            )
        if request.remote_kv_tokens and request.remote_kv_tokens != request.num_prompt_tokens:
            raise ValueError(f"request {request.request_id!r}: remote_kv_tokens must equal the prompt length")
        if request.remote_kv_tokens and len(request.output_token_ids) != 1:
            raise ValueError(f"request {request.request_id!r}: a handed-off request brings exactly its first token")
        request.status = RequestStatus.WAITING
        sp = request.sampling
        request.token_limit = min(request.num_prompt_tokens + sp.max_new_tokens, self.max_model_len)
        if self.prefill_only:
            request.token_limit = min(request.token_limit, request.num_prompt_tokens + 1)
        request.stop_token_set = frozenset(sp.stop_token_ids) | (
            frozenset() if sp.ignore_eos else frozenset(request.eos_token_ids))
        if self.caching:
            request.hash_root = root_hash(request.tenant, self.kv.policy.tenant_isolation)
        self.requests[request.request_id] = request
        self.waiting.append(request)
        if self._hooks:
            self.policy.on_arrival(request, request.arrival_time)

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
    # `schedule` and `update` are the simulator's inner loop (one iteration per request per step),
    # so they are written flat: no per-request objects or helper calls on the common decode path.
    def schedule(self, now: float) -> SchedulerOutput:
        prefill_phase = None  # None: both kinds of rows (HYBRID); True or False: TIME_SHARE's phase
        if self.limits.time_share:
            prefill_phase = self._time_share_phase()
        draft = self._rows(now, prefill_phase)
        if not draft.rows and prefill_phase is not None:
            # Nothing fits in this phase (a request may have given up its own blocks): the other
            # phase, so that the step makes progress.
            earlier = draft.preempted
            draft = self._rows(now, not prefill_phase)
            draft.preempted[:0] = earlier
            prefill_phase = not prefill_phase
        head, rows = draft.head, draft.rows
        if prefill_phase is not None and rows:
            self._decode_steps_since_prefill = 0 if prefill_phase else self._decode_steps_since_prefill + 1
        kv = self.kv
        if self._tiering and self.requests:
            # After admissions, so that a prefix about to be reused is not demoted first.
            kv.step_begin(now)
        self._step_id += 1
        columns, batch = self._columns(head, rows)
        preempted = draft.preempted
        if self._failed_since_last_step:
            preempted = self._failed_since_last_step + preempted
            self._failed_since_last_step = []
        ops = kv.take_ops()
        if draft.receives:
            ops = ops + tuple(draft.receives)  # tier moves first: they may free the blocks receives fill
        handoffs = tuple(r.request_id for r in rows if r.samples) if self.prefill_only else ()
        out = SchedulerOutput(self._step_id, *columns, preempted_ids=tuple(preempted),
                              finished_ids=tuple(self._finished_since_last_step), kv_ops=ops,
                              handoff_ids=handoffs, batch=batch)
        self._finished_since_last_step = []
        if head is not None:
            self._pending = (out, rows)
        return out

    def _columns(self, head: tuple | None, rows: list[Row]) -> tuple[tuple, tuple | None]:
        """The output's six columns from the steady head's columns and the rows, and the batch
        totals (kept from the steady decodes' running sums; None without a head)."""
        if head is None:
            return (tuple(zip(*rows)) if rows else ((),) * 6), None
        batch = decode_totals(len(head[0]), self.steady.start_sum())
        if not rows:
            return head, batch
        tail = tuple(zip(*rows))
        batch = tuple(map(add, batch, batch_totals(tail[1], tail[2], tail[5])))
        return tuple(map(add, head, tail)), batch

    def sync_request_state(self) -> None:
        """Write the deferred state of every steady decode into its `Request` (deferred mode)."""
        if self.steady is not None:
            self.steady.materialize_all()

    def _time_share_phase(self) -> bool:
        """TIME_SHARE's switching policy: True for a prefill step, False for a decode step."""
        has_prefill = bool(self.waiting)
        has_decode = False
        for req in self.running:
            if req.num_tokens - req.num_computed_tokens == 1 and req.num_computed_tokens >= req.num_prompt_tokens:
                has_decode = True
            else:
                has_prefill = True
            if has_prefill and has_decode:
                break
        if not (has_prefill and has_decode):
            return has_prefill
        return self._decode_steps_since_prefill >= self.limits.time_share_decode_steps

    def _admit(self, req: Request, start: int, now: float) -> None:
        """Move a waiting request to running with `start` tokens already in its blocks."""
        self._admissions += 1
        req.admit_seq = self._admissions
        if self.steady is not None:
            self._others.append(req)
        self._slots[req.request_id] = self.kv.num_slots(req.request_id)
        req.num_computed_tokens = start
        waiting = self.waiting
        if waiting[0] is req:
            waiting.popleft()
        else:
            waiting.remove(req)
        req.status = RequestStatus.RUNNING
        if req.first_scheduled_time is None:
            req.first_scheduled_time = now
        self.running.append(req)

    # ---- internals -------------------------------------------------------------------------
    def _hashes(self, req: Request, num_tokens: int) -> list[int]:
        """The request's block hashes, extended to cover its first `num_tokens` tokens."""
        hashes = req.block_hashes
        if len(hashes) < num_tokens // self.kv.block_size:
            extend_block_hashes(hashes, req.token_slice, self.kv.block_size, req.hash_root, num_tokens)
        return hashes

    def _recompute_failed(self, result: StepResult, now: float) -> None:
        """A KV load failed (checksum): forget the bad blocks and recompute the requests that read them."""
        self.kv.invalidate(result.failed_blocks)
        failed = [self.requests.get(rid) for rid in result.failed_request_ids]
        failed = [r for r in failed if r is not None and r.status is RequestStatus.RUNNING]
        for req in reversed(failed):  # back to the front of the queue, in their order
            rid = req.request_id
            self.running.remove(req)
            if self.steady is not None:
                self._others.remove(req)
            self._slots.pop(rid, None)
            self.kv.free(rid, now)
            req.num_computed_tokens = 0
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)
        self._failed_since_last_step += [r.request_id for r in failed]

    def _allocate(self, request_id: str, num_tokens: int) -> tuple[int, ...] | None:
        new_blocks = self.kv.allocate_slots(request_id, num_tokens)
        if new_blocks is None:
            return None
        self._slots[request_id] = self.kv.num_slots(request_id)
        return tuple(new_blocks)

    def _stop_status(self, req: Request, token: int, stopped_by_executor: bool) -> RequestStatus:
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
        if self.prefill_only and req.num_tokens < self.max_model_len:
            return RequestStatus.FINISHED_PREFILLED  # the rest is decoded elsewhere
        req.stop_reason = "max_model_len"  # the only other condition `update` checks
        return RequestStatus.FINISHED_LENGTH

    def _preempt(self, req: Request, now: float, swap: bool = True) -> None:
        """Take a running request's device blocks and put it first in line: swapped out to DDR
        (granularity REQUEST, when DDR has room) or to be recomputed."""
        rid = req.request_id
        if self.steady is not None:
            self._leave_running_sets(req)
        self._slots.pop(rid, None)
        if not (swap and self.swaps and self.kv.swap_out(rid, req.num_computed_tokens, now)):
            self.kv.free(rid, now)
            req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _to_others(self, reqs) -> None:
        """Deferred mode: running requests that just left the steady set join `_others`, in order."""
        for req in reqs:
            insort(self._others, req, key=by_admission)

    def _leave_running_sets(self, req: Request) -> None:
        """Deferred mode: a request leaving `running` leaves the steady set (its state written) or `_others`."""
        if req.request_id in self.steady:
            self.steady.leave(req)
        else:
            self._others.remove(req)

    def _finish(self, req: Request, status: RequestStatus, now: float) -> None:
        if self.steady is not None and req.status is RequestStatus.RUNNING:
            self._leave_running_sets(req)
        self.kv.free(req.request_id, now)
        self._slots.pop(req.request_id, None)
        req.status = status
        req.finish_time = now
        del self.requests[req.request_id]
        self._finished_since_last_step.append(req.request_id)
        if self._hooks:  # last: a hook that raises leaves the request finished and its blocks free
            self.policy.on_finish(req, now)
