"""Steady decodes: running requests whose per-step bookkeeping the scheduler defers (stdlib only).

A request in steady decode gets exactly one token per step, reuses its last sampled token as its
next input and has nothing to check until a known step: the one where its blocks are full, or
the one that produces its last token. Between those steps the scheduler has nothing to decide
for it, yet the plain loop spends a Python iteration per request per step writing its position,
its new token and the token's time. `SteadyDecodes` keeps such requests as parallel columns and
writes their state only when asked (`materialize`): a step costs a few C-level passes over the
columns instead of a Python iteration per request. This is what lets the simulator run the real
scheduler over millions of decode steps.

The deferred state is exact: `materialize` appends the very tokens the executor sampled and the
very times passed to `Scheduler.update`, in order, so a request leaves the set identical to one
that never entered it.
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import repeat
from operator import add, attrgetter, itemgetter

from sagellm.core.request import Request

_TRIM_EVERY = 512


class SteadyDecodes:
    """The steady-decode requests of one scheduler, ordered by admission (`Request.admit_seq`).

    Contract: `step` counts the updates recorded (`record`); a member that joined at step j0
    with `num_computed_tokens` = c is scheduled at step k with start position `c - j0 + k` and
    the token it sampled at step k - 1. `join` requires the request's state to be current; it
    then needs attention at two kinds of step only: when its block table is full (`due`, at
    `schedule`: the scheduler gives it a block and calls `got_block`) and at the step that
    produces its last token (`finishing`, at `update`: the scheduler takes it out and finishes
    it the plain way). `materialize`, `leave` and `leave_from` write the deferred tokens, token
    times and computed count into the `Request` objects. No other side effects; no clock.
    """

    def __init__(self) -> None:
        self.step = 0
        self.seqs: list[int] = []
        self.ids: list[str] = []
        self.offsets: list[int] = []  # start position at step k is offset + k
        self.joined: list[int] = []
        self.reqs: list[Request] = []
        self._offset_sum = 0
        self._ids: tuple[str, ...] | None = None  # tuple(ids), kept until membership changes
        self._finish_at: dict[str, int] = {}  # also the membership test
        self._finishing: dict[int, list[Request]] = {}  # step -> members making their last token
        self._full_at: dict[str, int] = {}  # request id -> step its table is full (if before its end)
        self._full: dict[int, list[Request]] = {}  # step -> members whose table is full then
        self._base = 0  # step of _tokens[0], _same[0] and _times[0]
        self._tokens: list[dict[str, int]] = []
        self._same: list[int | None] = []  # the token every request sampled at that step, if one
        self._times: list[float] = []

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._finish_at

    # ---- membership ----------------------------------------------------------------------
    def join(self, req: Request, slots: int) -> None:
        """Add a running request that has just sampled, decodes next and has at least two tokens
        to go; `slots` is what its blocks hold."""
        k = self.step
        rid = req.request_id
        offset = req.num_computed_tokens - k
        i = bisect_left(self.seqs, req.admit_seq)
        self.seqs.insert(i, req.admit_seq)
        self.ids.insert(i, rid)
        self.offsets.insert(i, offset)
        self.joined.insert(i, k)
        self.reqs.insert(i, req)
        self._offset_sum += offset
        self._ids = None
        finish = k + req.token_limit - req.num_tokens - 1
        self._finish_at[rid] = finish
        self._finishing.setdefault(finish, []).append(req)
        self._arm_full(req, slots - offset)

    def got_block(self, req: Request, index: int, slots: int) -> None:
        """Member `index`, listed by `due`, got one more block at this step."""
        del self._full_at[req.request_id]
        self._arm_full(req, slots - self.offsets[index])

    def _arm_full(self, req: Request, step: int) -> None:
        if step <= self._finish_at[req.request_id]:
            self._full_at[req.request_id] = step
            self._full.setdefault(step, []).append(req)

    def due(self) -> list[Request]:
        """Members whose block table is full at this step, in admission order."""
        return _take_sorted(self._full, self.step)

    def finishing(self) -> list[Request]:
        """Members that make their last token at this step, in admission order."""
        return _take_sorted(self._finishing, self.step)

    def index(self, req: Request) -> int:
        return bisect_left(self.seqs, req.admit_seq)

    def leave(self, req: Request) -> None:
        """Write the member's deferred state and remove it."""
        i = self.index(req)
        self.materialize(i)
        self._remove(i, i + 1)

    def leave_from(self, i: int) -> list[Request]:
        """Write the deferred state of the members from index `i` on and remove them; returns them."""
        for j in range(i, len(self.ids)):
            self.materialize(j)
        gone = self.reqs[i:]
        self._remove(i, len(self.ids))
        return gone

    def _remove(self, i: int, j: int) -> None:
        for req in self.reqs[i:j]:
            rid = req.request_id
            _unbucket(self._finishing, self._finish_at.pop(rid), req)
            _unbucket(self._full, self._full_at.pop(rid, None), req)
        self._offset_sum -= sum(self.offsets[i:j])
        self._ids = None
        del self.seqs[i:j], self.ids[i:j], self.offsets[i:j], self.joined[i:j], self.reqs[i:j]

    def materialize(self, i: int) -> None:
        """Bring member `i`'s `Request` up to date with every recorded step (it stays a member)."""
        req, j0, k = self.reqs[i], self.joined[i], self.step
        if k > j0:
            a, b = j0 - self._base, k - self._base
            same = self._same[a]
            if same is not None and self._same[a:b].count(same) == b - a:
                req.output_token_ids.extend(repeat(same, b - a))
            else:
                req.output_token_ids.extend(map(itemgetter(req.request_id), self._tokens[a:b]))
            req.token_times.extend(self._times[a:b])
            self.joined[i] = k
        req.num_computed_tokens = self.offsets[i] + k

    def materialize_all(self) -> None:
        for i in range(len(self.ids)):
            self.materialize(i)

    # ---- one step ------------------------------------------------------------------------
    def start_sum(self) -> int:
        """The members' start positions at this step, added up (their context before the step)."""
        return self._offset_sum + len(self.ids) * self.step

    def columns(self, new_blocks: dict[int, tuple[int, ...]]) -> tuple[tuple, tuple, tuple, tuple, tuple, tuple]:
        """The members' rows of this step as six columns in admission order (request ids, start
        positions, token ids, new blocks, resets, samples); `new_blocks` maps a member's index to
        the blocks it got this step."""
        n = len(self.ids)
        if not n:
            return (), (), (), (), (), ()
        ids = self._ids
        if ids is None:
            ids = self._ids = tuple(self.ids)
        same = self._same[-1]
        if same is not None:
            tokens = ((same,),) * n
        else:
            last = self._tokens[-1]
            try:
                tokens = tuple(zip(map(last.__getitem__, ids)))
            except KeyError:
                missing = next(rid for rid in ids if rid not in last)
                raise ValueError(f"step {self.step - 1}: no sampled token for {missing!r}") from None
        if new_blocks:
            blocks_list: list[tuple[int, ...]] = [()] * n
            for i, added in new_blocks.items():
                blocks_list[i] = added
            blocks = tuple(blocks_list)
        else:
            blocks = ((),) * n
        return (ids, tuple(map(add, self.offsets, repeat(self.step, n))), tokens, blocks,
                (False,) * n, (True,) * n)

    def record(self, sampled: dict[str, int], now: float) -> None:
        """One step's update: its sampled tokens (every member's among them) and its time."""
        self._tokens.append(sampled)
        values = list(sampled.values())
        self._same.append(values[0] if values and values.count(values[0]) == len(values) else None)
        self._times.append(now)
        self.step += 1
        if self.step % _TRIM_EVERY == 0:
            keep = min(min(self.joined, default=self.step), self.step - 1) - self._base
            if keep > 0:
                del self._tokens[:keep], self._same[:keep], self._times[:keep]
                self._base += keep


by_admission = attrgetter("admit_seq")  # sort key: running requests are in this order


def _take_sorted(buckets: dict[int, list[Request]], step: int) -> list[Request]:
    """Remove and return the bucket of `step`, in admission order."""
    bucket = buckets.pop(step, None)
    if bucket is None:
        return []
    if len(bucket) > 1:
        bucket.sort(key=by_admission)
    return bucket


def _unbucket(buckets: dict[int, list[Request]], step: int | None, req: Request) -> None:
    """Take `req` out of the bucket of `step`; a bucket already handed out is gone from `buckets`."""
    bucket = buckets.get(step)
    if bucket is not None:
        bucket.remove(req)
