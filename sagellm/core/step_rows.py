"""One step's rows as the scheduler builds them (standard library only)."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

from sagellm.core.kv.tiers import KVOp
from sagellm.core.request import Request


class Row(NamedTuple):
    """One request's part of a step; the fields are the columns of `SchedulerOutput`, in order."""

    request_id: str
    start: int  # position of its first token in this step
    token_ids: tuple[int, ...]
    new_block_ids: tuple[int, ...]
    resets_block_table: bool
    samples: bool  # the step ends at the request's last token, so it samples one


# `new_row((id, start, token ids, new blocks, resets, samples))` builds a `Row` in C, without the
# Python-level `__new__` that `Row(...)` runs: the scheduler builds one per scheduled request.
new_row = partial(tuple.__new__, Row)


class StepDraft:
    """The step being built: its rows, the budget left, and the caps on decode and prefill rows.

    `count(is_decode)` counts a row just added against its cap; `take_back(victim)` removes the
    row of a request preempted after it was scheduled in this step and gives back its budget. In
    TIME_SHARE (`prefill_phase` True or False) the other kind of row is skipped throughout.
    """

    __slots__ = ("budget", "prefill_phase", "max_decode", "max_prefill", "n_decode", "n_prefill",
                 "skip_decodes", "skip_prefills", "rows", "preempted", "receives", "head")

    def __init__(self, budget: int, prefill_phase: bool | None, max_decode: int, max_prefill: int) -> None:
        self.budget = budget
        self.prefill_phase = prefill_phase
        self.max_decode, self.max_prefill = max_decode, max_prefill
        self.n_decode = self.n_prefill = 0
        self.skip_decodes = prefill_phase is True
        self.skip_prefills = prefill_phase is False
        self.rows: list[Row] = []
        self.preempted: list[str] = []
        self.receives: list[KVOp] = []
        # Deferred mode: the steady decodes' rows as columns, ahead of `rows` (None otherwise).
        self.head: tuple | None = None

    def count(self, is_decode: bool) -> None:
        if is_decode:
            self.n_decode += 1
            self.skip_decodes = self.n_decode >= self.max_decode
        else:
            self.n_prefill += 1
            self.skip_prefills = self.n_prefill >= self.max_prefill

    def take_back(self, victim: Request) -> None:
        """Remove `victim`'s row, if it has one in this step, and uncount it."""
        rid = victim.request_id
        rows = self.rows
        for k in range(len(rows) - 1, -1, -1):
            if rows[k].request_id == rid:
                row = rows.pop(k)
                self.budget += len(row.token_ids)
                # counted as it was counted: a decode is the request's last token, past its prompt
                if row.samples and len(row.token_ids) == 1 and row.start >= victim.num_prompt_tokens:
                    self.n_decode -= 1
                    self.skip_decodes = self.prefill_phase is True or self.n_decode >= self.max_decode
                else:
                    self.n_prefill -= 1
                    self.skip_prefills = self.prefill_phase is False or self.n_prefill >= self.max_prefill
                return
