"""Per-request results, one schema for simulated and measured runs (standard library only)."""

from __future__ import annotations

from array import array
from dataclasses import asdict, dataclass, fields, replace
from itertools import islice
from operator import sub

from sagellm.core.request import Request


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request, in seconds of the run's clock (simulated or monotonic).

    `queueing_delay` is arrival to first schedule; `ttft` arrival to first token; `tpot` the mean
    gap between output tokens after the first (None with a single output token); `e2e_latency`
    arrival to finish; `itl_max` the longest gap between two output tokens. Times are None when
    the request never got that far (e.g. aborted while waiting).
    """

    request_id: str
    replica: int
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_preemptions: int
    finish_reason: str | None
    queueing_delay: float | None
    ttft: float | None
    tpot: float | None
    e2e_latency: float | None
    itl_max: float | None

    @classmethod
    def from_request(cls, req: Request, replica: int = 0, gaps: list[float] | None = None) -> RequestRecord:
        """The record of `req`; `gaps` may pass its inter-token latencies if already computed."""
        t = req.token_times
        arrival = req.arrival_time
        n = len(t)
        if gaps is None and n > 1:
            gaps = inter_token_gaps(t)
        itl_max = max(gaps) if n > 1 else None
        return cls(
            request_id=req.request_id,
            replica=replica,
            arrival_time=arrival,
            first_scheduled_time=req.first_scheduled_time,
            first_token_time=req.first_token_time,
            finish_time=req.finish_time,
            num_prompt_tokens=len(req.prompt_token_ids),
            num_output_tokens=len(req.output_token_ids),
            num_preemptions=req.num_preemptions,
            finish_reason=req.finish_reason,
            queueing_delay=None if req.first_scheduled_time is None else req.first_scheduled_time - arrival,
            ttft=None if req.first_token_time is None else req.first_token_time - arrival,
            tpot=(t[-1] - t[0]) / (n - 1) if n > 1 else None,
            e2e_latency=None if req.finish_time is None else req.finish_time - arrival,
            itl_max=itl_max,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def shifted(self, origin: float) -> RequestRecord:
        """The same record with its absolute times measured from `origin` (e.g. a run's start)."""
        def rel(t: float | None) -> float | None:
            return None if t is None else t - origin

        return replace(self, arrival_time=self.arrival_time - origin,
                       first_scheduled_time=rel(self.first_scheduled_time),
                       first_token_time=rel(self.first_token_time), finish_time=rel(self.finish_time))


RECORD_COLUMNS = tuple(f.name for f in fields(RequestRecord))


def inter_token_gaps(token_times: list[float]) -> list[float]:
    """Gaps between consecutive output tokens."""
    return list(map(sub, islice(token_times, 1, None), token_times))


class MetricsCollector:
    """Accumulates finished requests' records and every inter-token latency of a run.

    Side effect of `add`: reads the request's token times (it does not modify the request).
    `kv_usage` collects (time, fraction of KV blocks in use, running, waiting) samples via
    `sample_kv`, keeping one sample per `kv_sample_interval` seconds of the run's clock.
    """

    def __init__(self, kv_sample_interval: float = 0.0) -> None:
        self.records: list[RequestRecord] = []
        self.inter_token_latencies = array("d")
        self.kv_usage: list[tuple[float, float, int, int]] = []
        self.kv_sample_interval = kv_sample_interval
        self._next_kv_sample = float("-inf")

    def add(self, req: Request, replica: int = 0) -> RequestRecord:
        gaps = inter_token_gaps(req.token_times)
        rec = RequestRecord.from_request(req, replica, gaps)
        self.records.append(rec)
        self.inter_token_latencies.extend(gaps)
        return rec

    def sample_kv(self, now: float, usage: float, running: int, waiting: int) -> None:
        if now >= self._next_kv_sample:
            self.kv_usage.append((now, usage, running, waiting))
            self._next_kv_sample = now + self.kv_sample_interval
