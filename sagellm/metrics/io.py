"""Writing and printing run results, identically for simulated and measured runs."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sagellm.metrics.records import RECORD_COLUMNS, RequestRecord

SUMMARY_ROWS = (
    ("requests finished", "num_finished", "{:.0f}"),
    ("duration (s)", "duration", "{:.2f}"),
    ("throughput (req/s)", "request_throughput", "{:.3f}"),
    ("output tokens/s", "output_throughput", "{:.1f}"),
    ("total tokens/s", "total_token_throughput", "{:.1f}"),
    ("goodput (req/s)", "goodput", "{:.3f}"),
    ("preemptions", "num_preemptions", "{:.0f}"),
)
LATENCY_ROWS = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e_latency"),
                ("queueing", "queueing_delay"))


def write_records(path: Path, records: Sequence[RequestRecord]) -> None:
    """Per-request records as CSV, one row per request, columns `RECORD_COLUMNS` (without `tenant`
    when no request has one)."""
    columns = RECORD_COLUMNS if any(r.tenant for r in records) else tuple(c for c in RECORD_COLUMNS if c != "tenant")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in records:
            w.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v)
                        for v in (getattr(r, c) for c in columns)])


def write_run(directory: Path, records: Sequence[RequestRecord], summary: dict[str, Any],
              kv_usage: Sequence[tuple[float, float, int, int]] = (), info: dict[str, Any] | None = None) -> Path:
    """`requests.csv`, `summary.json` (summary + info) and `kv_usage.csv` in `directory` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_records(directory / "requests.csv", records)
    write_summary(directory, summary, info)
    write_kv_usage(directory, kv_usage)
    return directory


def write_summary(directory: Path, summary: dict[str, Any], info: dict[str, Any] | None = None) -> None:
    """`summary.json`: {"summary": ..., "info": ...}, NaN written as null."""
    doc = {"summary": jsonable(summary), "info": jsonable(info or {})}
    (Path(directory) / "summary.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def write_kv_usage(directory: Path, kv_usage: Sequence[tuple[float, float, int, int]]) -> None:
    """`kv_usage.csv`: time, fraction of KV blocks in use, running and waiting requests."""
    with open(Path(directory) / "kv_usage.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("time", "kv_usage", "num_running", "num_waiting"))
        w.writerows((repr(t), repr(u), r, q) for t, u, r, q in kv_usage)


def format_summary(summary: dict[str, Any], title: str = "") -> str:
    """The summary as an aligned text table (latencies in milliseconds)."""
    lines = [title] if title else []
    for label, key, fmt in SUMMARY_ROWS:
        if key in summary:
            lines.append(f"  {label:<22}{fmt.format(summary[key])}")
    lines.append(f"  {'latency (ms)':<22}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for label, key in LATENCY_ROWS:
        vals = [summary.get(f"{key}_{s}", math.nan) * 1e3 for s in ("mean", "p50", "p90", "p99")]
        lines.append(f"  {label:<22}" + "".join(f"{v:>10.1f}" for v in vals))
    return "\n".join(lines)


def jsonable(obj: Any) -> Any:
    """`obj` with string keys, lists for tuples and None for non-finite floats (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
