"""A request's mutable serving state, owned by the scheduler (standard library only)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from sagellm.core.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"
    # Done on a prefill-only worker: the first token is sampled and the KV leaves for a decode worker.
    FINISHED_PREFILLED = "prefilled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
    RequestStatus.FINISHED_PREFILLED,
}


@dataclass(eq=False, slots=True)
class Request:
    """One generation request as the policy layer sees it.

    Contract: `prompt_token_ids` is non-empty and never changes; `output_token_ids` grows by the
    scheduler's `update`. `num_computed_tokens` counts tokens whose KV is in the cache; it drops to 0
    when the request is preempted (recompute). Times are whatever clock the caller passes as `now`
    (monotonic seconds in the engine, simulated seconds in the simulator).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    eos_token_ids: tuple[int, ...] = ()
    tenant: str = ""
    # Lower is served first by the priority policy (vLLM's convention); any int.
    priority: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    stop_reason: str | None = None
    # On a decode-only worker: tokens of KV that arrive from the prefill worker at first admission
    # (the request comes with its first output token; 0 once received or after a preemption).
    remote_kv_tokens: int = 0
    # Set once: the prompt length; and, by the scheduler on admission, the total length at which the
    # request stops (max_new_tokens or the context window) and the token ids that stop it.
    num_prompt_tokens: int = field(init=False, default=0)
    token_limit: int = field(init=False, default=0)
    stop_token_set: frozenset[int] = field(init=False, default=frozenset())
    # Prefix caching: chained hashes of the request's full blocks so far, and the chain's root.
    block_hashes: list[int] = field(init=False, default_factory=list)
    hash_root: int = field(init=False, default=0)
    # Set by the scheduler at each admission: running requests are in increasing order of it.
    admit_seq: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must be a non-empty string")
        if len(self.prompt_token_ids) == 0:
            raise ValueError(f"request {self.request_id!r}: prompt is empty (needs at least one token)")
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what the KV cache must hold before the next sample."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_id_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return tuple(self.prompt_token_ids[start:end])
        if start >= n:
            return tuple(self.output_token_ids[start - n : end - n])
        return tuple(self.prompt_token_ids[start:]) + tuple(self.output_token_ids[: end - n])

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
