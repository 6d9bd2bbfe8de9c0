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
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from operator import add

from sagellm.core.kv.hashing import extend_block_hashes, root_hash
from sagellm.core.kv.manager import KVCacheManager
from sagellm.core.kv.tiers import RECEIVE, KVOp
from sagellm.core.outputs import SchedulerOutput, StepResult, batch_totals, decode_totals
from sagellm.core.pd import InferenceMode
from sagellm.core.policies.registry import PolicyError
from sagellm.core.policies.scheduling import make_scheduling_policy
from sagellm.core.request import Request, RequestStatus
from sagellm.core.steady import SteadyDecodes, by_admission
from sagellm.core.step_rows import Row, StepDraft, new_row


@dataclass(frozen=True)
class SchedulerLimits:
    """Per-step limits. `max_model_len` caps prompt plus output of one request; a step holds at
    most `max_prefill_batch` prefill rows and `max_decode_batch` decode rows (None: no cap beyond
    `max_num_seqs`). `time_share` makes every step prefill-only or decode-only, with
    `time_share_decode_steps` decode steps between prefill steps while both kinds of work wait.
    `role` is the worker's `InferenceMode` (STANDARD, PREFILL_ONLY or DECODE_ONLY)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    chunked_prefill: bool = True
    max_prefill_batch: int | None = None
    max_decode_batch: int | None = None
    time_share: bool = False
    time_share_decode_steps: int = 0
    role: InferenceMode = InferenceMode.STANDARD

    def __post_init__(self) -> None:
        if self.role not in (InferenceMode.STANDARD, InferenceMode.PREFILL_ONLY, InferenceMode.DECODE_ONLY):
            raise ValueError(f"role must be standard, prefill_only or decode_only, got {self.role!r}")
        if self.time_share_decode_steps < 0:
            raise ValueError(f"time_share_decode_steps must be >= 0, got {self.time_share_decode_steps}")
        for name in ("max_prefill_batch", "max_decode_batch"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {getattr(self, name)}")
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

    def _rows(self, now: float, prefill_phase: bool | None) -> StepDraft:
        """Build one step's rows; `prefill_phase` True keeps only prefill rows, False only decodes.
        Running requests first, in admission order (their block tables exist); then waiting
        requests in the policy's order, each starting a fresh block table. In deferred mode the
        draft's `head` holds the steady decodes at the front of `running` as columns (see
        `_steady_head`) and its rows continue after them."""
        draft = StepDraft(self.limits.max_num_batched_tokens, prefill_phase, self._max_decode, self._max_prefill)
        i = 0
        if self.steady is not None and prefill_phase is None:
            draft.head, i = self._steady_head()
            draft.budget -= i
            draft.n_decode = i
            draft.skip_decodes = i >= self._max_decode
        i = self._schedule_running(draft, i)
        if i < len(self.running) and draft.budget > 0:
            self._schedule_running_or_preempt(draft, i, now)
        if self.waiting and draft.budget > 0 and not draft.preempted and len(self.running) < self.limits.max_num_seqs:
            self._schedule_waiting(draft, now)
        return draft

    def _schedule_running(self, draft: StepDraft, i: int) -> int:
        """Rows for running requests from index `i` on until the first whose blocks cannot be
        allocated (the next loop preempts for it); returns the index it stopped at. The simulator's
        inner loop: written flat, with the common decode needing no KV manager call."""
        slots, running, rows = self._slots, self.running, draft.rows
        budget, skip_decodes, skip_prefills = draft.budget, draft.skip_decodes, draft.skip_prefills
        max_decode, max_prefill, n_decode, n_prefill = draft.max_decode, draft.max_prefill, draft.n_decode, 0
        for req in running[i:] if i else running:
            if budget <= 0:
                break
            start = req.num_computed_tokens
            out_ids = req.output_token_ids
            total = req.num_prompt_tokens + len(out_ids)
            rid = req.request_id
            is_decode = total - start == 1 and start >= req.num_prompt_tokens
            if is_decode and start < slots[rid]:  # a decode whose next token fits in its blocks
                if not skip_decodes:
                    rows.append(new_row((rid, start, (out_ids[-1],), (), False, True)))
                    budget -= 1
                    n_decode += 1
                    skip_decodes = n_decode >= max_decode
                i += 1
                continue
            if skip_decodes if is_decode else skip_prefills:
                i += 1
                continue
            end = min(total, start + budget)
            new_blocks: tuple[int, ...] | None = ()
            if end > slots[rid]:
                new_blocks = self._allocate(rid, end)
                if new_blocks is None:
                    break
            rows.append(new_row((rid, start, req.token_slice(start, end), new_blocks, False, end == total)))
            budget -= end - start
            if is_decode:
                n_decode += 1
                skip_decodes = n_decode >= max_decode
            else:
                n_prefill += 1
                skip_prefills = n_prefill >= max_prefill
            i += 1
        draft.budget, draft.n_decode, draft.n_prefill = budget, n_decode, n_prefill
        draft.skip_decodes, draft.skip_prefills = skip_decodes, skip_prefills
        return i

    def _schedule_running_or_preempt(self, draft: StepDraft, i: int, now: float) -> None:
        """Rows for the running requests from index `i` on, preempting (the policy's victims) to
        find their blocks; a request that has to preempt itself ends the loop."""
        running = self.running
        while i < len(running) and draft.budget > 0:
            req = running[i]
            start = req.num_computed_tokens
            total = req.num_tokens
            rid = req.request_id
            is_decode = total - start == 1 and start >= req.num_prompt_tokens
            if draft.skip_decodes if is_decode else draft.skip_prefills:
                i += 1
                continue
            end = start + min(total - start, draft.budget)
            new_blocks: tuple[int, ...] | None = ()
            if end > self._slots[rid]:
                new_blocks, i = self._blocks_by_preempting(draft, req, end, i, now)
                if new_blocks is None:
                    return
            draft.rows.append(new_row((rid, start, req.token_slice(start, end), new_blocks, False, end == total)))
            draft.budget -= end - start
            draft.count(is_decode)
            i += 1

    def _blocks_by_preempting(self, draft: StepDraft, req: Request, end: int, i: int, now: float
                              ) -> tuple[tuple[int, ...] | None, int]:
        """Blocks for `req` (at running index `i`) to hold `end` tokens, preempting victims until
        they fit: (the new blocks or None if `req` itself was preempted or nothing frees enough,
        `req`'s index after the victims left)."""
        rid = req.request_id
        new_blocks = self._allocate(rid, end)
        while new_blocks is None:
            if self._fcfs:
                victim = self.running.pop()
            else:
                victim, j = self._take_victim(now)
                if j < i:  # scheduled earlier in this step: take its row back
                    i -= 1
                    draft.take_back(victim)
            self._preempt(victim, now)
            draft.preempted.append(victim.request_id)
            if victim is req:
                return None, i
            new_blocks = self._allocate(rid, end)
        return new_blocks, i

    def _schedule_waiting(self, draft: StepDraft, now: float) -> None:
        """Admit waiting requests in the policy's order while the budget, `max_num_seqs`, the row
        caps and the KV pool allow; the first that does not fit ends admission (head-of-line)."""
        max_num_seqs, running = self.limits.max_num_seqs, self.running
        for req in self._fcfs_heads() if self._fcfs else self._policy_order(now):
            if draft.budget <= 0 or len(running) >= max_num_seqs:
                return
            if req.remote_kv_tokens:
                if draft.skip_decodes or not self._admit_handed_off(draft, req, now):
                    return
                continue
            if draft.skip_prefills:
                return
            placed = self._admission_blocks(req, draft.budget, now)
            if placed is None:
                return
            start, end, new_blocks = placed
            self._admit(req, start, now)
            draft.rows.append(new_row((req.request_id, start, req.token_slice(start, end), new_blocks, True,
                                       end == req.num_tokens)))
            draft.budget -= end - start
            draft.count(False)

    def _admit_handed_off(self, draft: StepDraft, req: Request, now: float) -> bool:
        """Admit a request whose prompt's KV arrives from a prefill worker: its blocks, the receive
        operations that fill them, and its first decode row. False when its blocks do not fit."""
        kv, rid, total = self.kv, req.request_id, req.num_tokens
        start = req.remote_kv_tokens
        added = kv.allocate_slots(rid, total)
        if added is None:
            return False
        draft.receives.extend(KVOp(RECEIVE, "staging", j, "hbm", block, rid)
                              for j, block in enumerate(added[: -(-start // kv.block_size)]))
        req.remote_kv_tokens = 0
        self._admit(req, start, now)
        draft.rows.append(new_row((rid, start, req.token_slice(start, total), tuple(added), True, True)))
        draft.budget -= total - start
        draft.count(True)
        return True

    def _admission_blocks(self, req: Request, budget: int, now: float
                          ) -> tuple[int, int, tuple[int, ...]] | None:
        """Where a waiting request starts (after its cached prefix, or its swapped-out tokens),
        where this step ends it within `budget`, and its new blocks: (start, end, blocks), or None
        when it does not fit (no chunking allowed, or too few blocks)."""
        kv, rid, total = self.kv, req.request_id, req.num_tokens
        hits = None
        if self.swaps and kv.is_swapped(rid):
            start = req.num_computed_tokens
        elif self.caching:
            query = (total - 1) // kv.block_size
            hits = kv.lookup(self._hashes(req, total - 1)[:query])
            start = len(hits) * kv.block_size
        else:
            start = 0
        if total - start > budget and not self.limits.chunked_prefill:
            return None
        end = start + min(total - start, budget)
        if hits is not None:
            new_blocks = kv.admit(rid, req.block_hashes, hits, end, query, now)
        elif start:
            new_blocks = kv.swap_in(rid, end, now)
        else:
            added = kv.allocate_slots(rid, end)
            new_blocks = None if added is None else tuple(added)
        return None if new_blocks is None else (start, end, new_blocks)

    def _steady_head(self) -> tuple[tuple, int]:
        """The first loop of `_rows` for the steady decodes at the front of `running` (deferred mode).

        The plain loop gives each of them one token and, when its table is full, one block, in
        admission order. That is done here in bulk for the members admitted before every other
        running request, up to the budget and the decode cap, stopping at the first member a block
        cannot be found for. The members after that point leave the set, so that the plain loop
        can go on from there. Returns (the members' columns, the number of members scheduled,
        which is also the running index the plain loop goes on from).
        """
        st = self.steady
        seqs, others = st.seqs, self._others
        n = bisect_left(seqs, others[0].admit_seq) if others else len(seqs)
        n = min(n, self.limits.max_num_batched_tokens, self._max_decode)
        new_blocks: dict[int, tuple[int, ...]] = {}
        due = st.due()
        if due:
            slots, block_size, kv = self._slots, self.kv.block_size, self.kv
            due = [(i, req) for req in due if (i := bisect_left(seqs, req.admit_seq)) < n]
            if len(due) > kv.num_free_blocks:  # the plain loop would stop at the first that fails
                n = due[kv.num_free_blocks][0]
                due = due[:kv.num_free_blocks]
            for (i, req), block in zip(due, kv.append_blocks([req.request_id for _, req in due])):
                new_blocks[i] = (block,)
                rid = req.request_id
                slots[rid] = room = slots[rid] + block_size
                st.got_block(req, i, room)
        if n < len(seqs):
            self._to_others(st.leave_from(n))
        return st.columns(new_blocks), n

    def _fcfs_heads(self):
        """The head of the waiting queue, again after each admission (FCFS: the admission loop
        admits the head or stops)."""
        waiting = self.waiting
        while waiting:
            yield waiting[0]

    def _policy_order(self, now: float) -> list[Request]:
        """The policy's admission order, checked: each request waiting here, at most once."""
        ordered = self.policy.order(tuple(self.waiting), now)
        seen: set[str] = set()
        for req in ordered:
            rid = getattr(req, "request_id", None)
            if (self.requests.get(rid) is not req or req.status not in _WAITING_STATES or rid in seen):
                raise PolicyError(f"scheduler.policy: {_policy_name(self.policy)}.order() returned "
                                  f"{rid if rid is not None else req!r}, which is not a waiting request of this "
                                  "scheduler (or is returned twice); order() must return waiting requests only")
            seen.add(rid)
        return ordered

    def _take_victim(self, now: float) -> tuple[Request, int]:
        """The policy's preemption victim, checked to be running, removed from `running`; with its
        index there before the removal."""
        running = self.running
        victim = self.policy.victim(tuple(running), now)
        for j, req in enumerate(running):
            if req is victim:
                del running[j]
                return victim, j
        raise PolicyError(f"scheduler.policy: {_policy_name(self.policy)}.victim() returned "
                          f"{getattr(victim, 'request_id', victim)!r}, which is not a running request of this "
                          "scheduler; victim() must return one of the running requests")

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

    def update(self, output: SchedulerOutput, result: StepResult, now: float) -> list[Request]:
        """Apply one step's result; return the requests that finished in it."""
        columns = (output.request_ids, output.start_positions, output.token_ids, output.samples)
        st = self.steady
        if st is None:
            return self._apply(output, result, now, *columns)
        pending, self._pending = self._pending, None
        stopped = result.stopped_ids
        if (pending is None or pending[0] is not output or result.failed_request_ids or result.failed_blocks
                or (stopped and any(rid in st for rid in stopped))):
            # Out of the ordinary: write every member's state, then apply the step the plain way.
            self._to_others(st.leave_from(0))
            finished = self._apply(output, result, now, *columns)
            st.record(result.sampled_token_ids, now)
            return finished
        # Members that make their last token in this step leave the set and finish the plain way;
        # their rows come before the others' in the output, in admission order.
        rows = pending[1]
        ids, starts, tokens, _, _, samples = zip(*rows) if rows else _NO_COLUMNS
        last = st.finishing()
        if last:
            last_ids, last_starts = [], []
            for req in last:
                last_ids.append(req.request_id)
                last_starts.append(st.offsets[st.index(req)] + st.step)
                st.leave(req)
                self._to_others((req,))
            ids, starts = last_ids + list(ids), last_starts + list(starts)
            tokens, samples = [_ONE_TOKEN] * len(last) + list(tokens), [True] * len(last) + list(samples)
        finished = self._apply(output, result, now, ids, starts, tokens, samples)
        st.record(result.sampled_token_ids, now)
        requests, running_status, others, slots = self.requests, RequestStatus.RUNNING, self._others, self._slots
        for row in rows:
            rid = row.request_id
            req = requests.get(rid)
            # A member's next input is the token it sampled in the step before (see `columns`).
            if (row.samples and req is not None and req.status is running_status and not req.stop_token_set
                    and req.num_computed_tokens == req.num_tokens - 1 >= req.num_prompt_tokens
                    and req.token_limit - req.num_tokens >= 2):
                others.remove(req)
                st.join(req, slots[rid])
        return finished

    def _apply(self, output: SchedulerOutput, result: StepResult, now: float, request_ids: Sequence[str],
               starts: Sequence[int], token_ids: Sequence[tuple[int, ...]], samples: Sequence[bool]
               ) -> list[Request]:
        """`update` for the rows of `output` given as columns (request ids, starts, token ids,
        whether each samples)."""
        finished: list[Request] = []
        stopped = result.stopped_ids
        sampled = result.sampled_token_ids
        requests = self.requests
        running_status = RequestStatus.RUNNING
        if result.failed_request_ids or result.failed_blocks:
            self._recompute_failed(result, now)
        caching, bs = self.caching, self.kv.block_size
        for rid, start, toks, sampled_here in zip(request_ids, starts, token_ids, samples):
            req = requests.get(rid)
            if req is None or req.status is not running_status:
                continue  # aborted or preempted after scheduling
            computed = req.num_computed_tokens = start + len(toks)
            if caching and computed // bs != start // bs:
                self.kv.cache_computed(rid, self._hashes(req, computed), computed)
            if self._hooks:
                prompt = req.num_prompt_tokens
                self.policy.on_service(req, max(0, min(computed, prompt) - start), 1 if sampled_here else 0)
            if not sampled_here:
                continue
            try:
                token = sampled[rid]
            except KeyError:
                raise ValueError(f"step {output.step_id}: no sampled token for {rid!r}") from None
            out_ids = req.output_token_ids
            out_ids.append(token)
            req.token_times.append(now)
            if req.first_token_time is None:
                req.first_token_time = now
            if (
                req.num_prompt_tokens + len(out_ids) >= req.token_limit
                or token in req.stop_token_set
                or (stopped and rid in stopped)
            ):
                status = self._stop_status(req, token, rid in stopped)
                self.running.remove(req)
                self._finish(req, status, now)
                finished.append(req)
        return finished

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


_ONE_TOKEN = (0,)  # `update` reads only the length of a finishing member's row
_NO_COLUMNS = ((),) * 6
_WAITING_STATES = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


def _policy_name(policy: object) -> str:
    return getattr(policy, "name", "") or type(policy).__name__
