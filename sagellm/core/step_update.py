"""How the scheduler applies a step's result (standard library only).

`StepUpdate` is a part of `sagellm.core.scheduler.Scheduler` (it reads and changes the scheduler's
state); it is in its own module so that each file has one job.
"""

from __future__ import annotations

from collections.abc import Sequence

from sagellm.core.outputs import SchedulerOutput, StepResult
from sagellm.core.request import Request, RequestStatus

_ONE_TOKEN = (0,)  # `update` reads only the length of a finishing member's row
_NO_COLUMNS = ((),) * 6


class StepUpdate:
    """`Scheduler.update`: sampled tokens in, finished requests out; see `Scheduler`."""

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
        caching, bs, hooks = self.caching, self.kv.block_size, self._hooks
        for rid, start, toks, sampled_here in zip(request_ids, starts, token_ids, samples):
            req = requests.get(rid)
            if req is None or req.status is not running_status:
                continue  # aborted or preempted after scheduling
            computed = req.num_computed_tokens = start + len(toks)
            if caching and computed // bs != start // bs:
                self.kv.cache_computed(rid, self._hashes(req, computed), computed)
            if hooks:
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
