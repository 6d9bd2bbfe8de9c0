"""How the scheduler builds one step's rows: running requests first, then admissions in the
policy's order, preempting the policy's victims when blocks run out (standard library only).

`StepBuilding` is a part of `sagellm.core.scheduler.Scheduler` (it reads the scheduler's state and
has no state of its own); it is in its own module so that each file has one job.
"""

from __future__ import annotations

from bisect import bisect_left

from sagellm.core.kv.tiers import RECEIVE, KVOp
from sagellm.core.policies.registry import PolicyError
from sagellm.core.request import Request, RequestStatus
from sagellm.core.step_rows import StepDraft, new_row

_WAITING_STATES = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


class StepBuilding:
    """The row-building half of `Scheduler.schedule`; see `Scheduler`."""

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


def _policy_name(policy: object) -> str:
    return getattr(policy, "name", "") or type(policy).__name__
