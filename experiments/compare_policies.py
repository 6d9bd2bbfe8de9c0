"""Policies compared on both sides of one experiment run: the simulated ranking against the live one,
and each policy's predicted ratio to a baseline against the measured ratio.

`python -m experiments.compare_policies RESULTS [--key sagellm.scheduler.policy] [--baseline fcfs]
[--metrics ttft_mean,...]` prints the tables as Markdown (docs/policies.md quotes them);
`notebooks/policies.ipynb` shows them. For routers: `--key cluster.router --baseline least_outstanding
--metrics ttft_mean,ttft_p90,prefix_hit_rate`.

Live values are the median over a point's counted repeats; a point's *spread* is the range (max - min)
of its repeats. Two policies' live medians *differ* when they are further apart than the larger of
their spreads; the ranking check counts, for every such pair, whether the simulator orders them the
same way.
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass

import pandas as pd

from experiments.results import RunData, load_run

METRICS = ("ttft_mean", "ttft_p90", "tpot_mean", "goodput")
RATIO_METRICS = ("ttft_mean", "ttft_p90")
RATIO_TOLERANCE = 0.10


@dataclass(frozen=True)
class RankCheck:
    """Pairs of policies whose live medians differ (beyond their spreads), and how many of them the
    simulator orders the same way, for one group of points (e.g. one arrival rate) and one metric."""

    group: str
    metric: str
    pairs_that_differ: int
    same_order: int
    disagreements: tuple[str, ...]


def sweep_keys(run: RunData) -> list[str]:
    """The run's swept keys (a variants sweep shows as its labels, under `variants`)."""
    return [k for k in run.manifest.get("sweep") or {} if k in run.summary.columns]


def tenant_metrics(run: RunData) -> list[str]:
    return sorted(c for c in run.summary.columns if c.startswith("tenant_"))


def side_table(run: RunData, metrics: tuple[str, ...] | list[str] = METRICS) -> pd.DataFrame:
    """One row per point: its sweep values, and per metric the simulated value (`<m>_sim`: the median
    of the point's simulations, one per live run when each is priced by its own reference), the live
    median (`<m>_live`) and the live range over repeats (`<m>_spread`)."""
    summary, keys = run.summary, sweep_keys(run)
    rows = []
    for point, frame in summary.groupby("point", sort=True):
        row: dict = {"point": point, **{k: frame[k].iloc[0] for k in keys}}
        sim, live = frame[frame["side"] == "simulate"], frame[frame["side"] == "live"]
        for m in metrics:
            row[f"{m}_sim"] = float(sim[m].median()) if not sim.empty and m in sim else math.nan
            values = live[m].dropna() if m in live else pd.Series(dtype=float)
            row[f"{m}_live"] = float(values.median()) if len(values) else math.nan
            row[f"{m}_spread"] = float(values.max() - values.min()) if len(values) else math.nan
        row["live_repeats"] = len(live)
        rows.append(row)
    return pd.DataFrame(rows)


def _other_keys(table: pd.DataFrame, key: str) -> list[str]:
    """The sweep keys of a side table other than `key`: points equal in them form one group."""
    return [c for c in table.columns if c not in (key, "point", "live_repeats")
            and not c.endswith(("_sim", "_live", "_spread"))]


def rank_checks(table: pd.DataFrame, key: str, metrics: tuple[str, ...] | list[str] = METRICS) -> list[RankCheck]:
    """For each group of points that differ only in `key` (other sweep keys equal) and each metric:
    the pairs whose live medians differ by more than their spreads, and whether the simulator orders
    each such pair as measured."""
    others = _other_keys(table, key)
    groups = table.groupby(others, sort=True) if others else [((), table)]
    checks = []
    for values, frame in groups:
        label = ", ".join(f"{k}={v}" for k, v in zip(others, values if isinstance(values, tuple) else (values,)))
        for m in metrics:
            differ = same = 0
            wrong = []
            for (_, a), (_, b) in itertools.combinations(frame.iterrows(), 2):
                live_gap = a[f"{m}_live"] - b[f"{m}_live"]
                if not abs(live_gap) > max(a[f"{m}_spread"], b[f"{m}_spread"]):
                    continue
                differ += 1
                if (a[f"{m}_sim"] - b[f"{m}_sim"]) * live_gap > 0:
                    same += 1
                else:
                    wrong.append(f"{a[key]} vs {b[key]}")
            checks.append(RankCheck(label or "all", m, differ, same, tuple(wrong)))
    return checks


def baseline_ratios(table: pd.DataFrame, key: str, baseline: str,
                    metrics: tuple[str, ...] | list[str] = RATIO_METRICS) -> pd.DataFrame:
    """Per point and metric: the simulator's ratio to the baseline policy's point with the same other
    sweep values (`predicted`), the live medians' ratio (`measured`), and predicted / measured - 1
    (`error`)."""
    others = _other_keys(table, key)
    rows = []
    for _, row in table.iterrows():
        match = table[table[key] == baseline]
        for k in others:
            match = match[match[k] == row[k]]
        if match.empty:
            continue
        base = match.iloc[0]
        for m in metrics:
            predicted = row[f"{m}_sim"] / base[f"{m}_sim"]
            measured = row[f"{m}_live"] / base[f"{m}_live"]
            rows.append({key: row[key], **{k: row[k] for k in others}, "metric": m, "predicted": predicted,
                         "measured": measured, "error": predicted / measured - 1})
    return pd.DataFrame(rows)


def compact(table: pd.DataFrame, key: str, metrics: list[str], keys: list[str]) -> pd.DataFrame:
    """One row per point and one column per metric, each cell "simulated / live median (live range)"."""
    def cell(row: pd.Series, m: str) -> str:
        sim, live, spread = row[f"{m}_sim"], row[f"{m}_live"], row[f"{m}_spread"]
        return f"{sim:.3g}" if math.isnan(live) else f"{sim:.3g} / {live:.3g} ({spread:.2g})"

    frame = table[[key, *[k for k in keys if k != key]]].copy()
    for m in metrics:
        frame[m] = [cell(row, m) for _, row in table.iterrows()]
    return frame


def replica_balance(run: RunData) -> pd.DataFrame:
    """Per point and side folder: how evenly the replicas shared the work, as the busiest replica's
    tokens (prompt + output of the requests it served) over the mean per replica (1.0: even), and
    each replica's request count. Empty for single-replica runs."""
    default = int((run.manifest.get("config", {}).get("cluster") or {}).get("num_replicas", 1))
    rows = []
    for point in run.manifest["points"]:
        num_replicas = int(point["overrides"].get("cluster.num_replicas", default))
        for path in sorted((run.path / "points" / point["slug"]).glob("*/requests.parquet")):
            records = pd.read_parquet(path)
            tokens = (records["num_prompt_tokens"] + records["num_output_tokens"]).groupby(records["replica"]).sum()
            n = max(num_replicas, len(tokens))
            if n < 2:
                continue
            rows.append({"point": point["slug"], "side": path.parent.name,
                         "max_over_mean": tokens.max() / (tokens.sum() / n),
                         "requests_per_replica": records["replica"].value_counts().sort_index().tolist()})
    return pd.DataFrame(rows)


def markdown(run: RunData, key: str, baseline: str, metrics: list[str] | None = None) -> str:
    metrics = [*(metrics or METRICS), *tenant_metrics(run)]
    table = side_table(run, metrics)
    lines = ["Per point, simulated / live median (range of the live repeats); latencies in s, goodput in req/s:",
             "", compact(table, key, metrics, sweep_keys(run)).to_markdown(index=False), ""]
    checks = rank_checks(table, key, metrics)
    lines += ["Ranking (pairs whose live medians differ by more than their spreads):", "",
              "| group | metric | pairs that differ | simulator orders them the same | disagreements |",
              "|---|---|---|---|---|"]
    lines += [f"| {c.group} | {c.metric} | {c.pairs_that_differ} | {c.same_order} | {', '.join(c.disagreements)} |"
              for c in checks]
    ratios = baseline_ratios(table, key, baseline)
    within = (ratios["error"].abs() <= RATIO_TOLERANCE).sum() if not ratios.empty else 0
    lines += ["", f"Ratio to `{baseline}` (error: predicted / measured - 1; within {RATIO_TOLERANCE:.0%}: "
              f"{within} of {len(ratios)}):", "", ratios.round(3).to_markdown(index=False)]
    balance = replica_balance(run)
    if not balance.empty:
        lines += ["", "Load balance (busiest replica's tokens over the mean per replica):", "",
                  balance.round(3).to_markdown(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a run folder, or results/<name> for its newest run")
    ap.add_argument("--key", default="sagellm.scheduler.policy", help="the swept key that names the policy")
    ap.add_argument("--baseline", default="fcfs", help="the policy the ratios are taken to")
    ap.add_argument("--metrics", default=",".join(METRICS),
                    help="comma-separated summary columns to compare (tenant columns are added when present)")
    args = ap.parse_args(argv)
    print(markdown(load_run(args.results), args.key, args.baseline, args.metrics.split(",")))


if __name__ == "__main__":
    main()
