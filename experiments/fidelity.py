"""Predicted vs measured: the fidelity table of one experiment point."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

FIDELITY_METRICS = (
    "request_throughput", "output_throughput",
    "ttft_mean", "ttft_p50", "ttft_p90", "ttft_p99",
    "tpot_mean", "tpot_p50", "tpot_p90", "tpot_p99",
    "e2e_latency_mean", "e2e_latency_p50", "e2e_latency_p90", "e2e_latency_p99",
    "goodput", "slo_attainment", "handoff_mean_s",
)
# The acceptance bounds (load sweep; goodput and the KV hand-off of the PD modes): |relative error|
# allowed per metric.
TOLERANCES = {"request_throughput": 0.05, "output_throughput": 0.05, "tpot_mean": 0.05, "ttft_mean": 0.10,
              "ttft_p90": 0.10, "goodput": 0.10, "handoff_mean_s": 0.20}


@dataclass(frozen=True)
class FidelityRow:
    """One metric: the prediction, the median of the live repeats, their min and max, and
    (predicted - measured) / measured."""

    metric: str
    predicted: float
    measured: float
    measured_min: float
    measured_max: float
    relative_error: float
    tolerance: float | None

    @property
    def within(self) -> bool | None:
        if self.tolerance is None or math.isnan(self.relative_error):
            return None
        return abs(self.relative_error) <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "within_tolerance": self.within}


def compare(predicted: dict[str, float], measured_runs: list[dict[str, float]]) -> list[FidelityRow]:
    """One row per metric in FIDELITY_METRICS present in both sides."""
    rows = []
    for m in FIDELITY_METRICS:
        vals = [r[m] for r in measured_runs if m in r and r[m] is not None and not math.isnan(r[m])]
        p = predicted.get(m)
        if not vals or p is None or math.isnan(p):
            continue
        med = statistics.median(vals)
        err = (p - med) / med if med else math.nan
        rows.append(FidelityRow(m, p, med, min(vals), max(vals), err, TOLERANCES.get(m)))
    return rows


def format_table(rows: list[FidelityRow], title: str = "") -> str:
    """Aligned text table; latencies in ms, throughputs and ratios as they are, spread = live min..max."""
    lines = [title] if title else []
    lines.append(f"  {'metric':<20}{'predicted':>12}{'measured':>12}{'live spread':>22}{'error':>9}  ok")
    for r in rows:
        latency = r.metric.startswith(("ttft", "tpot", "e2e_latency", "handoff"))
        scale = 1e3 if latency else 1.0
        unit = " ms" if latency else ""
        spread = f"{r.measured_min * scale:.1f}..{r.measured_max * scale:.1f}{unit}"
        ok = {True: "yes", False: "NO", None: ""}[r.within]
        lines.append(f"  {r.metric:<20}{r.predicted * scale:>12.2f}{r.measured * scale:>12.2f}{spread:>22}"
                     f"{r.relative_error:>+9.1%}  {ok}")
    return "\n".join(lines)
