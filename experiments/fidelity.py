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
    (predicted - measured) / measured. With one prediction per live run (paired with each run's
    serving reference), `predicted` is their median and `predicted_min`/`predicted_max` their
    spread; with a single prediction both are None."""

    metric: str
    predicted: float
    measured: float
    measured_min: float
    measured_max: float
    relative_error: float
    tolerance: float | None
    predicted_min: float | None = None
    predicted_max: float | None = None

    @property
    def within(self) -> bool | None:
        if self.tolerance is None or math.isnan(self.relative_error):
            return None
        return abs(self.relative_error) <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "within_tolerance": self.within}


def _values(runs: list[dict[str, float]], metric: str) -> list[float]:
    return [r[metric] for r in runs if r.get(metric) is not None and not math.isnan(r[metric])]


def compare(predicted: dict[str, float] | list[dict[str, float]],
            measured_runs: list[dict[str, float]]) -> list[FidelityRow]:
    """One row per metric in FIDELITY_METRICS present in both sides. `predicted` is one
    simulation's summary, or a list of them (one per live run): then their median is the
    prediction, compared with the median of the live runs, and their min and max are kept."""
    several = isinstance(predicted, list)
    rows = []
    for m in FIDELITY_METRICS:
        vals = _values(measured_runs, m)
        preds = _values(predicted, m) if several else _values([predicted], m)
        if not vals or not preds:
            continue
        p, med = statistics.median(preds), statistics.median(vals)
        err = (p - med) / med if med else math.nan
        spread = (min(preds), max(preds)) if several else (None, None)
        rows.append(FidelityRow(m, p, med, min(vals), max(vals), err, TOLERANCES.get(m), *spread))
    return rows


@dataclass(frozen=True)
class StepCheck:
    """The cost model against the live runs' own steps: for each step kind ("all",
    `simulator.cost.profiled.SERVING_KINDS`, and decode row bands `BAND_KEYS`), the number of
    steps, the measured and predicted
    seconds summed over them, and predicted / measured - 1. It separates an error in step time (the
    cost model, or the machine's speed during the run vs its speed probe) from an error in what the
    simulator's run did with those steps (batching, queueing)."""

    kind: str
    num_steps: int
    measured_s: float
    predicted_s: float

    @property
    def relative_error(self) -> float:
        return self.predicted_s / self.measured_s - 1 if self.measured_s else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "relative_error": self.relative_error}


def check_steps(cost_model: Any, steps: Any, speed: Any = None) -> list[StepCheck]:
    """`cost_model.batch_time` (a `ProfiledCostModel`, already scaled for the machine's speed) on
    every step of `steps` (a frame of `BatchShape` fields, `seconds` and `end_time`, the live runs'
    steps), times `speed(start of the step)` when given (a `SpeedTrace` of the run)."""
    from experiments.results import step_batches
    from simulator.cost.profiled import BAND_KEYS, SERVING_KINDS, decode_band, serving_kind

    sums = {kind: [0, 0.0, 0.0] for kind in ("all", *SERVING_KINDS, *BAND_KEYS)}
    batches, seconds = step_batches(steps)
    starts = [0.0] * len(batches)
    if speed is not None:
        nonempty = steps[steps["num_seqs"] > 0]
        starts = (nonempty["end_time"] - nonempty["seconds"]).tolist()
    for batch, measured, start in zip(batches, seconds, starts):
        predicted = cost_model.batch_time(batch) * (speed(start) if speed is not None else 1.0)
        step_kind = serving_kind(batch.num_seqs, batch.num_decodes)
        for kind in ("all", step_kind, *([decode_band(batch.num_seqs)] if step_kind == "decode" else [])):
            acc = sums[kind]
            acc[0] += 1
            acc[1] += measured
            acc[2] += predicted
    return [StepCheck(kind, n, m, p) for kind, (n, m, p) in sums.items() if n]


def format_step_check(checks: list[StepCheck], title: str = "") -> str:
    lines = [title] if title else []
    for c in checks:
        lines.append(f"  {c.kind + ' steps':<20}{c.num_steps:>7} steps  measured {c.measured_s:8.2f} s  "
                     f"predicted {c.predicted_s:8.2f} s  error {c.relative_error:+.1%}")
    return "\n".join(lines)


def format_table(rows: list[FidelityRow], title: str = "") -> str:
    """Aligned text table; latencies in ms, throughputs and ratios as they are, spread = live
    min..max (and, with one prediction per live run, the predictions' min..max)."""
    lines = [title] if title else []
    paired = any(r.predicted_min is not None for r in rows)
    sim_head = f"{'sim spread':>22}" if paired else ""
    lines.append(f"  {'metric':<20}{'predicted':>12}{sim_head}{'measured':>12}{'live spread':>22}{'error':>9}  ok")
    for r in rows:
        latency = r.metric.startswith(("ttft", "tpot", "e2e_latency", "handoff"))
        scale = 1e3 if latency else 1.0
        unit = " ms" if latency else ""
        spread = f"{r.measured_min * scale:.1f}..{r.measured_max * scale:.1f}{unit}"
        sim = ""
        if paired:
            sim = ("" if r.predicted_min is None
                   else f"{r.predicted_min * scale:.1f}..{r.predicted_max * scale:.1f}{unit}")
            sim = f"{sim:>22}"
        ok = {True: "yes", False: "NO", None: ""}[r.within]
        lines.append(f"  {r.metric:<20}{r.predicted * scale:>12.2f}{sim}{r.measured * scale:>12.2f}{spread:>22}"
                     f"{r.relative_error:>+9.1%}  {ok}")
    return "\n".join(lines)
