"""Run-level metrics: latency percentiles, throughput, goodput under SLOs (one schema for both sides)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sagellm.metrics.records import RequestRecord

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "e2e_latency", "queueing_delay")


@dataclass(frozen=True)
class SLO:
    """Latency objectives in seconds; a request meets the SLO when its TTFT and TPOT are within them.

    A request with one output token has no TPOT and meets that part. None disables a bound.
    """

    ttft: float | None = None
    tpot: float | None = None

    def met_by(self, rec: RequestRecord) -> bool:
        if rec.ttft is None:
            return False
        if self.ttft is not None and rec.ttft > self.ttft:
            return False
        return not (self.tpot is not None and rec.tpot is not None and rec.tpot > self.tpot)


def _stats(prefix: str, values: Sequence[float]) -> dict[str, float]:
    import numpy as np

    vals = np.asarray(values, dtype=np.float64)
    if vals.size == 0:
        return {f"{prefix}_mean": math.nan, **{f"{prefix}_p{q}": math.nan for q in PERCENTILES}}
    out = {f"{prefix}_mean": float(vals.mean())}
    for q, v in zip(PERCENTILES, np.percentile(vals, PERCENTILES)):
        out[f"{prefix}_p{q}"] = float(v)
    return out


def summarize(
    records: Sequence[RequestRecord],
    inter_token_latencies: Sequence[float] = (),
    slo: SLO | None = None,
    duration: float | None = None,
) -> dict[str, float]:
    """Flat dict of run metrics (seconds, requests/s, tokens/s).

    `duration` defaults to first arrival to last finish. Throughputs count finished requests only;
    `goodput` is finished requests meeting `slo` per second (DistServe's definition).
    """
    finished = [r for r in records if r.finish_time is not None and r.finish_reason not in ("abort", "error")]
    if duration is None:
        if finished:
            duration = max(r.finish_time for r in finished) - min(r.arrival_time for r in records)
        else:
            duration = 0.0
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    out_tokens = sum(r.num_output_tokens for r in finished)
    in_tokens = sum(r.num_prompt_tokens for r in finished)
    summary: dict[str, float] = {
        "num_requests": len(records),
        "num_finished": len(finished),
        "duration": duration,
        "request_throughput": rate(len(finished)),
        "output_throughput": rate(out_tokens),
        "total_token_throughput": rate(out_tokens + in_tokens),
        "num_preemptions": sum(r.num_preemptions for r in records),
    }
    for name in LATENCY_METRICS:
        summary.update(_stats(name, [getattr(r, name) for r in finished if getattr(r, name) is not None]))
    summary.update(_stats("itl", inter_token_latencies))
    if slo is not None:
        good = sum(1 for r in finished if slo.met_by(r))
        summary["goodput"] = rate(good)
        summary["slo_attainment"] = good / len(records) if records else math.nan
    if any(r.tenant for r in records):
        summary.update(tenant_summary(records, finished))
    return summary


def tenant_summary(records: Sequence[RequestRecord], finished: Sequence[RequestRecord]) -> dict[str, float]:
    """Per tenant T: `tenant_T_ttft_mean` over its finished requests, and `tenant_T_service_share`,
    its share of the tokens (prompt and output) of the requests that finished while requests were
    still arriving (up to the last arrival): the service each tenant got while all were sending."""
    window_end = max(r.arrival_time for r in records)
    served = [r for r in finished if r.finish_time <= window_end]
    total = sum(r.num_prompt_tokens + r.num_output_tokens for r in served)
    out: dict[str, float] = {}
    for tenant in sorted({r.tenant for r in records}):
        ttfts = [r.ttft for r in finished if r.tenant == tenant and r.ttft is not None]
        out[f"tenant_{tenant}_ttft_mean"] = sum(ttfts) / len(ttfts) if ttfts else math.nan
        tokens = sum(r.num_prompt_tokens + r.num_output_tokens for r in served if r.tenant == tenant)
        out[f"tenant_{tenant}_service_share"] = tokens / total if total else math.nan
    return out


def handoff_summary(seconds: list[float]) -> dict[str, float | int]:
    """Count, mean, p50 and p90 of prefill-to-decode KV hand-off durations (seconds), for both sides."""
    ordered = sorted(seconds)
    n = len(ordered)

    def pct(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] if n else 0.0

    return {"count": n, "mean_s": sum(ordered) / n if n else 0.0, "p50_s": pct(0.5), "p90_s": pct(0.9)}
