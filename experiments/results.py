"""The results folder of an experiment run: writing each side's output and reading a run back.

```
results/<name>/<UTC time>/
  manifest.json           resolved config, git revision, hardware, package versions, seed, points
  summary.csv             one row per point and side (live: one row per repeat) with every metric
  fidelity.csv            one row per point and metric: predicted, measured (median), spread, error
  points/<point>/simulate/{requests.parquet, summary.json, kv_usage.csv}
  points/<point>/live-<r>/{requests.parquet, summary.json, steps.parquet[, idle_probe.parquet]}
                             steps: every engine step's batch shape, seconds, end time and worker
                             idle_probe: the idle speed probe's timings during the run
  points/<point>/live-<r>/reference[-after]/   the serving references around the run, same files
  points/<point>/done.json   written last: the point is complete (a resumed run skips it)
  plots/*.png
```
Notebooks read only this folder, through `load_run`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sagellm.metrics.io import write_kv_usage, write_summary
from sagellm.metrics.records import RECORD_COLUMNS, RequestRecord

IDLE_PROBE_FILE = "idle_probe.parquet"


def write_side(directory: Path, records: list[RequestRecord], summary: dict[str, Any],
               info: dict[str, Any] | None = None, kv_usage: list | None = None, steps: list | None = None,
               probe: list | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([r.to_dict() for r in records], columns=list(RECORD_COLUMNS))
    frame.to_parquet(directory / "requests.parquet", index=False)
    if steps:
        pd.DataFrame([{**asdict(s.batch), "seconds": s.seconds, "end_time": s.end_time,
                       "worker": s.worker} for s in steps]
                     ).to_parquet(directory / "steps.parquet", index=False)
    if probe:
        pd.DataFrame([{"end_time": p.end_time, "seconds": p.seconds} for p in probe]
                     ).to_parquet(directory / IDLE_PROBE_FILE, index=False)
    write_summary(directory, summary, info)
    if kv_usage is not None:
        write_kv_usage(directory, kv_usage)


@dataclass
class RunData:
    """A run read back: manifest, summary and fidelity tables, and where its points live."""

    path: Path
    manifest: dict[str, Any]
    summary: pd.DataFrame
    fidelity: pd.DataFrame

    def requests(self, point: str, side: str) -> pd.DataFrame:
        """Per-request records of one point and side ("simulate", "live-0", ...)."""
        return pd.read_parquet(self.path / "points" / point / side / "requests.parquet")

    def steps(self, point: str, side: str) -> pd.DataFrame:
        """The engine steps of one live run (`BatchShape` fields, seconds, end_time); an empty table
        for a run that logged none (a cluster, or a run older than the step log)."""
        return read_steps(self.path / "points" / point / side)

    @property
    def points(self) -> list[str]:
        return [p["slug"] for p in self.manifest["points"]]


def load_run(path: str | Path) -> RunData:
    """Read a run folder; `path` may also be `results/<name>`, meaning its newest run."""
    path = Path(path)
    if not (path / "manifest.json").exists():
        runs = sorted(p for p in path.glob("*/") if (p / "manifest.json").exists()) if path.is_dir() else []
        if not runs:
            raise FileNotFoundError(f"{path}: no experiment run here (no manifest.json)")
        path = runs[-1]
    manifest = json.loads((path / "manifest.json").read_text())
    summary, fidelity = _read_csv(path / "summary.csv"), _read_csv(path / "fidelity.csv")
    return RunData(path, manifest, summary, fidelity)


def step_batches(steps: pd.DataFrame) -> tuple[list, list[float]]:
    """The non-empty steps of a `steps.parquet` frame as (`BatchShape`s, seconds)."""
    from sagellm.graph.batch import BatchShape

    fields = list(BatchShape.__dataclass_fields__)
    batches, seconds = [], []
    if steps.empty:
        return batches, seconds
    for row in steps[[*fields, "seconds"]].itertuples(index=False):
        batch = BatchShape(*(int(v) for v in row[:-1]))
        if batch.num_seqs:
            batches.append(batch)
            seconds.append(float(row[-1]))
    return batches, seconds


def read_steps(side_dir: Path) -> pd.DataFrame:
    """`steps.parquet` of a live side's folder, or an empty table when there is none."""
    path = Path(side_dir) / "steps.parquet"
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def _read_csv(path: Path) -> pd.DataFrame:
    """A table, or an empty one when the file is missing or has no rows."""
    if not path.exists() or not path.read_text().strip():
        return pd.DataFrame()
    return pd.read_csv(path)


def read_idle_probe(side_dir: Path) -> pd.DataFrame:
    """`idle_probe.parquet` of a live side's folder (end_time, seconds), or an empty table."""
    path = Path(side_dir) / IDLE_PROBE_FILE
    return pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["end_time", "seconds"])
