"""Messages between the policy layer and an executor: plain frozen data (standard library only).

`SchedulerOutput` says what to compute in one step; `StepResult` says what came of it. Both are
loggable as JSON (`to_dict`), and both the live engine and the simulator consume and produce them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step.

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

    `finished_ids` lists requests that ended (stopped, aborted) since the previous step, so the
    executor can drop per-request state; `preempted_ids` lists requests whose blocks were freed
    this step (they will return with `resets_block_table`).
    """

    step_id: int
    scheduled: tuple[ScheduledRequest, ...]
    preempted_ids: tuple[str, ...] = ()
    finished_ids: tuple[str, ...] = ()

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepResult:
    """What one step produced.

    `sampled_token_ids` maps request id to its new token for every scheduled request with
    `samples`; `stopped_ids` lists requests the executor ended on its own (a stop string matched);
    `duration` is the step's wall or predicted time in seconds.
    """

    step_id: int
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    stopped_ids: tuple[str, ...] = ()
    duration: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)
