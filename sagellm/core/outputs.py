"""Messages between the policy layer and an executor: plain frozen data (standard library only).

`SchedulerOutput` says what to compute in one step; `StepResult` says what came of it. Both are
loggable as JSON (`to_dict`), and both the live engine and the simulator consume and produce them.

`SchedulerOutput` is columnar (one tuple per field, one entry per scheduled request, as vLLM v1 does
for its running requests): a simulated step costs a few tuple operations instead of one object per
request, which is what lets the simulator run the real scheduler at millions of tokens per minute.
`SchedulerOutput.scheduled` gives the same data as one `ScheduledRequest` per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from sagellm.core.kv.tiers import KVOp


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step (a row view of `SchedulerOutput`).

    Contract: compute `token_ids`, which occupy positions `start_position ..
    start_position + len(token_ids) - 1`. `new_block_ids` are appended to the request's block table
    before the step; when `resets_block_table` is true (first schedule since admission or since a
    preemption) the table is exactly `new_block_ids`. When `samples` is true the step must sample
    the request's next token from the logits of its last position.
    """

    request_id: str
    start_position: int
    token_ids: tuple[int, ...]
    new_block_ids: tuple[int, ...]
    resets_block_table: bool
    samples: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_length(self) -> int:
        """Tokens in the KV cache after this step for this request."""
        return self.start_position + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.start_position > 0 and self.samples


@dataclass(frozen=True)
class SchedulerOutput:
    """Everything an executor needs for one step.

    The six per-request tuples are parallel: entry i of each describes the i-th scheduled request
    (same meaning as the fields of `ScheduledRequest`). `finished_ids` lists requests that ended
    (stopped, aborted) since the previous step, so the executor can drop per-request state;
    `preempted_ids` lists requests whose blocks were freed since the previous step (preempted, or
    sent back to recompute after a failed KV load; they return with `resets_block_table`).
    `kv_ops` are the KV operations (`KVOp`: offloads, loads, promotions, drops between tiers) to
    run, in order, before the step's forward pass. `handoff_ids` (prefill-only workers) are the
    requests whose prompt completes in this step: the executor exports their KV for a decode
    worker. Construction checks that the columns have equal lengths.

    `batch`, when the scheduler filled it in, is `batch_totals` of the columns, kept from the
    running sums the scheduler already has (its steady decodes), so that a cost model need not pass
    over the columns again. It is derived data: left out of equality, `to_dict` and `repr`, and
    None in an output built by hand.
    """

    step_id: int
    request_ids: tuple[str, ...] = ()
    start_positions: tuple[int, ...] = ()
    token_ids: tuple[tuple[int, ...], ...] = ()
    new_block_ids: tuple[tuple[int, ...], ...] = ()
    resets_block_table: tuple[bool, ...] = ()
    samples: tuple[bool, ...] = ()
    preempted_ids: tuple[str, ...] = ()
    finished_ids: tuple[str, ...] = ()
    kv_ops: tuple[KVOp, ...] = ()
    handoff_ids: tuple[str, ...] = ()
    batch: tuple[int, int, int, int, int, int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.request_ids)
        if not (len(self.start_positions) == len(self.token_ids) == len(self.new_block_ids)
                == len(self.resets_block_table) == len(self.samples) == n):
            for name in ("start_positions", "token_ids", "new_block_ids", "resets_block_table", "samples"):
                if len(getattr(self, name)) != n:
                    raise ValueError(f"SchedulerOutput.{name} has {len(getattr(self, name))} entries, expected {n}")

    @classmethod
    def from_scheduled(
        cls,
        step_id: int,
        scheduled: tuple[ScheduledRequest, ...] | list[ScheduledRequest],
        preempted_ids: tuple[str, ...] = (),
        finished_ids: tuple[str, ...] = (),
    ) -> SchedulerOutput:
        """Build the columnar message from row views (convenient in tests and tools)."""
        return cls(
            step_id=step_id,
            request_ids=tuple(s.request_id for s in scheduled),
            start_positions=tuple(s.start_position for s in scheduled),
            token_ids=tuple(tuple(s.token_ids) for s in scheduled),
            new_block_ids=tuple(tuple(s.new_block_ids) for s in scheduled),
            resets_block_table=tuple(s.resets_block_table for s in scheduled),
            samples=tuple(s.samples for s in scheduled),
            preempted_ids=tuple(preempted_ids),
            finished_ids=tuple(finished_ids),
        )

    @cached_property
    def scheduled(self) -> tuple[ScheduledRequest, ...]:
        """One `ScheduledRequest` per scheduled request, in scheduling order."""
        return tuple(
            ScheduledRequest(*row)
            for row in zip(
                self.request_ids,
                self.start_positions,
                self.token_ids,
                self.new_block_ids,
                self.resets_block_table,
                self.samples,
            )
        )

    @property
    def num_scheduled(self) -> int:
        return len(self.request_ids)

    @property
    def num_scheduled_tokens(self) -> tuple[int, ...]:
        return tuple(map(len, self.token_ids))

    @property
    def num_batched_tokens(self) -> int:
        return sum(map(len, self.token_ids))

    @property
    def is_empty(self) -> bool:
        return not self.request_ids

    def to_dict(self) -> dict:
        return {
            "step_id": self.step_id,
            "request_ids": list(self.request_ids),
            "start_positions": list(self.start_positions),
            "token_ids": [list(t) for t in self.token_ids],
            "new_block_ids": [list(b) for b in self.new_block_ids],
            "resets_block_table": list(self.resets_block_table),
            "samples": list(self.samples),
            "preempted_ids": list(self.preempted_ids),
            "finished_ids": list(self.finished_ids),
            "kv_ops": [op.to_dict() for op in self.kv_ops],
            "handoff_ids": list(self.handoff_ids),
        }


def batch_totals(start_positions: tuple[int, ...] | list[int], token_ids: tuple[tuple[int, ...], ...] | list,
                 samples: tuple[bool, ...] | list[bool]) -> tuple[int, int, int, int, int, int]:
    """The fields of `sagellm.graph.BatchShape` for these columns of a step: (new tokens, requests,
    one-token decodes after a non-empty context, rows that sample, causal (query, key) pairs,
    context tokens attended to).

    Written with C-level passes (`map`, `sum`, `count`) plus one comprehension that keeps the
    multi-token chunks, because the simulator calls it every step with mostly one-token decodes.
    """
    starts = start_positions
    lens = list(map(len, token_ids))
    n_seqs = len(lens)
    tokens = sum(lens)
    s = sum(starts)
    ctx = s + tokens
    zeros = starts.count(0)
    if tokens == n_seqs:  # one token each
        return tokens, n_seqs, n_seqs - zeros, sum(samples), ctx, ctx
    chunks = [(n, c) for n, c in zip(lens, starts) if n > 1]
    # one-token entries contribute c + 1 pairs each; chunks n*c + n*(n+1)/2
    pairs = s + (n_seqs - len(chunks))
    for n, c in chunks:
        pairs += n * c + n * (n + 1) // 2 - c
        if c == 0:
            zeros -= 1
    return tokens, n_seqs, n_seqs - len(chunks) - zeros, sum(samples), pairs, ctx


def decode_totals(num_decodes: int, start_sum: int) -> tuple[int, int, int, int, int, int]:
    """`batch_totals` of `num_decodes` one-token, sampling decodes whose start positions (all > 0)
    add up to `start_sum`, without the columns."""
    ctx = start_sum + num_decodes
    return num_decodes, num_decodes, num_decodes, num_decodes, ctx, ctx


@dataclass(frozen=True)
class StepResult:
    """What one step produced.

    `sampled_token_ids` maps request id to its new token for every scheduled request with
    `samples`; `stopped_ids` lists requests the executor ended on its own (a stop string matched);
    `duration` is the step's wall or predicted time in seconds (KV operations included).
    `failed_blocks` are device blocks whose KV load failed its checksum and `failed_request_ids`
    the requests that would have read them: the executor left those out of the step, and the
    scheduler recomputes them.
    """

    step_id: int
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    stopped_ids: tuple[str, ...] = ()
    duration: float = 0.0
    failed_blocks: tuple[int, ...] = ()
    failed_request_ids: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"step_id": self.step_id, "sampled_token_ids": dict(self.sampled_token_ids),
                "stopped_ids": list(self.stopped_ids), "duration": self.duration,
                "failed_blocks": list(self.failed_blocks), "failed_request_ids": list(self.failed_request_ids)}
