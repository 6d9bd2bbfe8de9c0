"""Per-request results, one schema for simulated and measured runs (standard library only)."""

from __future__ import annotations

from array import array
from dataclasses import asdict, dataclass, fields, replace
from itertools import chain, islice
from operator import sub

from sagellm.core.request import Request


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request, in seconds of the run's clock (simulated or monotonic).

    `queueing_delay` is arrival to first schedule; `ttft` arrival to first token; `tpot` the mean
    gap between output tokens after the first (None with a single output token); `e2e_latency`
    arrival to finish; `itl_max` the longest gap between two output tokens. Times are None when
    the request never got that far (e.g. aborted while waiting). `tenant` is the request's tenant
    ("" when it has none).
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
    tenant: str = ""

    @classmethod
    def from_request(cls, req: Request, replica: int = 0, gaps: list[float] | None = None,
                     itl_max: float | None = None) -> RequestRecord:
        """The record of `req`; `gaps` may pass its inter-token latencies, or `itl_max` their
        maximum, if already computed."""
        t = req.token_times
        arrival = req.arrival_time
        n = len(t)
        if n < 2:
            itl_max = None
        elif itl_max is None:
            itl_max = max(inter_token_gaps(t) if gaps is None else gaps)
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
            tenant=req.tenant,
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

    `add` keeps a reference to the finished request; its token times are read into one flat array
    and the records and the gaps between tokens are computed in bulk (numpy) for up to
    `FLUSH_EVERY` requests at a time, when that many are pending or when `records` or
    `inter_token_latencies` is read. The values are those of `RequestRecord.from_request`
    (the same float subtractions), at a fraction of the per-request cost. Side effects of `add`:
    none on the request (it must not change after it is added: a finished request does not).
    `kv_usage` collects (time, fraction of KV blocks in use, running, waiting) samples via
    `sample_kv`, keeping one sample per `kv_sample_interval` seconds of the run's clock.
    """

    FLUSH_EVERY = 1024

    def __init__(self, kv_sample_interval: float = 0.0) -> None:
        self._records: list[RequestRecord] = []
        self._itl = array("d")
        self._pending: list[tuple[Request, int]] = []
        self.kv_usage: list[tuple[float, float, int, int]] = []
        self.kv_sample_interval = kv_sample_interval
        self._next_kv_sample = float("-inf")

    @property
    def records(self) -> list[RequestRecord]:
        """Every added request's record, in the order added."""
        if self._pending:
            self._flush()
        return self._records

    @property
    def inter_token_latencies(self) -> array:
        """Every gap between two consecutive output tokens of the added requests, request by request."""
        if self._pending:
            self._flush()
        return self._itl

    @property
    def num_records(self) -> int:
        return len(self._records) + len(self._pending)

    def add_rejected(self, request_id: str, replica: int, arrival_time: float, num_prompt_tokens: int,
                     now: float) -> None:
        """Record a request refused on arrival (finish reason "error", no tokens) without building
        it: a prompt too long for the context window is refused before its token ids are made."""
        if self._pending:
            self._flush()
        self._records.append(RequestRecord(request_id, replica, arrival_time, None, None, now, num_prompt_tokens,
                                           0, 0, "error", None, None, None, now - arrival_time, None))

    def add(self, req: Request, replica: int = 0) -> None:
        self._pending.append((req, replica))
        if len(self._pending) >= self.FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        import numpy as np

        pending = self._pending
        counts = np.fromiter((len(req.token_times) for req, _ in pending), dtype=np.int64, count=len(pending))
        times = np.fromiter(chain.from_iterable(req.token_times for req, _ in pending), dtype=np.float64,
                            count=int(counts.sum()))
        diffs = np.diff(times)
        # diffs[k] is times[k + 1] - times[k]; drop the ones that cross from one request to the next.
        ends = np.cumsum(counts)
        keep = np.ones(len(diffs), dtype=bool)
        crossing = ends[:-1] - 1
        keep[crossing[(crossing >= 0) & (crossing < len(diffs))]] = False
        gaps = diffs[keep]
        self._itl.frombytes(gaps.tobytes())
        many = counts > 1
        firsts = np.cumsum(np.maximum(counts - 1, 0)) - (counts - 1)  # each request's first gap in `gaps`
        maxima = np.maximum.reduceat(gaps, firsts[many]).tolist() if many.any() else []
        records = self._records
        it = iter(maxima)
        for (req, replica), n in zip(pending, counts.tolist()):
            records.append(RequestRecord.from_request(req, replica, itl_max=next(it) if n > 1 else None))
        self._pending = []

    def sample_kv(self, now: float, usage: float, running: int, waiting: int) -> None:
        if now >= self._next_kv_sample:
            self.kv_usage.append((now, usage, running, waiting))
            self._next_kv_sample = now + self.kv_sample_interval
