"""Prefill/decode scheduling modes and the coordinator of a disaggregated cluster (standard library only).

`ScheduleMode` says how prefill and decode work share hardware:

- `HYBRID`: one worker, continuous batching with chunked prefill; running decodes go first and
  prefill chunks fill the rest of the token budget (Sarathi-Serve's stall-free batching).
- `TIME_SHARE`: one worker alternates prefill-only and decode-only steps; `time_share_decode_steps`
  is the switching policy (decode steps between two prefill steps while both kinds wait; 0 runs a
  prefill step whenever new work can be admitted, as vLLM's first engine did).
- `STRICT`: prefill workers and decode workers are separate; each request is prefilled on one
  worker, its KV handed to a decode worker, and decoded there. `PDCoordinator` picks both.

`InferenceMode` is the role one worker (one scheduler) plays: `STANDARD` serves whole requests
(HYBRID or TIME_SHARE), `PREFILL_ONLY` computes prompts and their first token and hands the rest
off, `DECODE_ONLY` takes handed-off requests whose KV arrives from elsewhere. `PD_SEPARATE` names
the whole STRICT deployment: its workers run `PREFILL_ONLY` and `DECODE_ONLY`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ScheduleMode(str, enum.Enum):
    HYBRID = "hybrid"
    TIME_SHARE = "time_share"
    STRICT = "strict"


class InferenceMode(str, enum.Enum):
    STANDARD = "standard"
    PREFILL_ONLY = "prefill_only"
    DECODE_ONLY = "decode_only"
    PD_SEPARATE = "pd_separate"


def resolve_modes(mode: str, inference_mode: str) -> tuple[ScheduleMode, InferenceMode]:
    """The (schedule mode, inference mode) pair a config names; ValueError "<field>: ..." when they
    disagree. `pd_separate` implies `strict` and `strict` implies `pd_separate`."""
    try:
        sm = ScheduleMode(mode)
    except ValueError:
        raise ValueError(f"mode: {mode!r} is not one of {[m.value for m in ScheduleMode]}") from None
    try:
        im = InferenceMode(inference_mode)
    except ValueError:
        raise ValueError(f"inference_mode: {inference_mode!r} is not one of "
                         f"{[m.value for m in InferenceMode]}") from None
    if im is InferenceMode.PD_SEPARATE and sm is not ScheduleMode.STRICT:
        if mode != ScheduleMode.HYBRID.value:
            raise ValueError(f"inference_mode: pd_separate runs mode strict, not {mode!r}")
        sm = ScheduleMode.STRICT
    if sm is ScheduleMode.STRICT:
        if im not in (InferenceMode.STANDARD, InferenceMode.PD_SEPARATE):
            raise ValueError(f"inference_mode: {inference_mode!r} is the role of one worker; mode strict "
                             "deploys prefill_only and decode_only workers itself (use standard or pd_separate)")
        im = InferenceMode.PD_SEPARATE
    return sm, im


@dataclass(frozen=True)
class KVHandoff:
    """One request's KV leaving its prefill worker for its decode worker.

    `num_tokens` tokens of KV (the prompt) in `num_blocks` blocks of `block_bytes` each;
    `first_token` was sampled on the prefill worker at `prefilled_at`.
    """

    request_id: str
    prefill_worker: int
    decode_worker: int
    num_tokens: int
    num_blocks: int
    first_token: int
    prefilled_at: float

    def num_bytes(self, block_bytes: int) -> int:
        return self.num_blocks * block_bytes


class NoWorkerError(RuntimeError):
    """Every worker of a kind has failed: the cluster cannot serve new requests."""


class PDCoordinator:
    """Routes requests in a STRICT cluster: a prefill worker and a decode worker for each.

    Contract: `assign(request_id)` picks the prefill worker and the decode worker with the fewest
    requests assigned and not yet completed (lowest index on ties), records the pair, and returns
    it; `complete(request_id)` forgets it (unknown ids are ignored). `fail_decode_worker(i)` and
    `fail_prefill_worker(i)` take a worker out of routing and return the ids of the requests
    assigned to it (still recorded: the caller completes or reassigns them). `reassign(request_id)`
    gives a request a new pair among the live workers; `redirect(request_id)` only a new decode
    worker. NoWorkerError when no worker of a kind is left.
    """

    def __init__(self, num_prefill: int, num_decode: int) -> None:
        if num_prefill <= 0 or num_decode <= 0:
            raise ValueError(f"a STRICT cluster needs prefill and decode workers, got {num_prefill} and {num_decode}")
        self.prefill_load = [0] * num_prefill
        self.decode_load = [0] * num_decode
        self.prefill_alive = [True] * num_prefill
        self.decode_alive = [True] * num_decode
        self.assigned: dict[str, tuple[int, int]] = {}

    def assign(self, request_id: str) -> tuple[int, int]:
        if request_id in self.assigned:
            raise ValueError(f"request_id {request_id!r} is already assigned")
        pair = (_least(self.prefill_load, self.prefill_alive, "prefill"),
                _least(self.decode_load, self.decode_alive, "decode"))
        self.prefill_load[pair[0]] += 1
        self.decode_load[pair[1]] += 1
        self.assigned[request_id] = pair
        return pair

    def complete(self, request_id: str) -> None:
        pair = self.assigned.pop(request_id, None)
        if pair is not None:
            self.prefill_load[pair[0]] -= 1
            self.decode_load[pair[1]] -= 1

    def reassign(self, request_id: str) -> tuple[int, int]:
        self.complete(request_id)
        return self.assign(request_id)

    def redirect(self, request_id: str) -> int:
        p, d = self.assigned[request_id]
        new = _least(self.decode_load, self.decode_alive, "decode")
        self.decode_load[d] -= 1
        self.decode_load[new] += 1
        self.assigned[request_id] = (p, new)
        return new

    def fail_decode_worker(self, index: int) -> list[str]:
        self.decode_alive[index] = False
        return [rid for rid, (_, d) in self.assigned.items() if d == index]

    def fail_prefill_worker(self, index: int) -> list[str]:
        self.prefill_alive[index] = False
        return [rid for rid, (p, _) in self.assigned.items() if p == index]


def _least(load: list[int], alive: list[bool], kind: str) -> int:
    best = None
    for i, n in enumerate(load):
        if alive[i] and (best is None or n < load[best]):
            best = i
    if best is None:
        raise NoWorkerError(f"no {kind} worker is alive")
    return best
