"""Figures and display tables of an experiment run, drawn from its results folder only.

Everything here reads a `RunData` (see `experiments.results`); nothing runs the engine or the simulator.
Figures are drawn on matplotlib's Agg canvas directly (`Figure` + `FigureCanvasAgg`), so importing this
module does not touch pyplot's global backend (a notebook keeps its inline backend) and nothing is shown:
every plotting function writes a PNG and returns its path.

Units: the results folder holds seconds; figures and display tables show latencies in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments.results import RunData, load_run

MS = 1e3
SIDE_LABELS = {"simulate": "predicted (simulator)", "live": "measured (live)"}
SIDE_COLORS = {"simulate": "tab:blue", "live": "tab:orange"}
SIDE_STYLES = {"simulate": {"marker": "o", "linestyle": "-"}, "live": {"marker": "s", "linestyle": "--"}}
# Per-request columns of the CDF figure: (column of RECORD_COLUMNS, panel title).
CDF_METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e_latency", "end-to-end latency"))
# Panels of the latency-vs-sweep figure: (summary column, axis label); all latencies.
LATENCY_PANELS = (("ttft_mean", "mean TTFT (ms)"), ("ttft_p90", "p90 TTFT (ms)"), ("tpot_mean", "mean TPOT (ms)"))
# Panels of the policy-sweep figure: (summary column, axis label).
SWEEP_PANELS = (("ttft_mean", "mean TTFT (ms)"), ("tpot_mean", "mean TPOT (ms)"),
                ("output_throughput", "output throughput (tokens/s)"), ("goodput", "goodput (req/s)"))
# Panels of the goodput figure (scheduling modes against request rate).
GOODPUT_PANELS = (("goodput", "goodput (req/s)"), ("ttft_mean", "mean TTFT (ms)"), ("tpot_mean", "mean TPOT (ms)"))
LATENCY_PREFIXES = ("ttft", "tpot", "e2e_latency", "queueing_delay", "itl", "handoff_mean")
POINT_INDEX = "point index"
RATE_KEY = "workload.arrival.rate"  # the preferred x axis of sweep figures


# ---------------------------------------------------------------------------------------------- helpers

def is_latency(metric: str) -> bool:
    """True for summary latency metrics (`ttft_mean`, `e2e_latency_p90`, ...), which are stored in seconds."""
    return metric.rsplit("_", 1)[0] in LATENCY_PREFIXES


def unit_of(metric: str) -> str:
    """Display unit of a summary metric: "ms" for latencies, "req/s", "tokens/s", or "" (counts, ratios, s)."""
    if is_latency(metric):
        return "ms"
    if metric in ("request_throughput", "goodput"):
        return "req/s"
    if metric.endswith("_throughput"):
        return "tokens/s"
    return "s" if metric == "duration" else ""


def scale_of(metric: str) -> float:
    """Factor from stored units to display units (1000 for latencies, else 1)."""
    return MS if is_latency(metric) else 1.0


def sweep_keys(run: RunData) -> list[str]:
    """The run's sweep keys (dotted paths) in manifest order; empty without a sweep."""
    return list(run.manifest.get("sweep") or {})


def side_dirs(run: RunData, point: str) -> dict[str, list[str]]:
    """Sides of `point` that have per-request data: {"simulate": ["simulate"], "live": ["live-0", ...]}
    (with one simulation per live run, "simulate": ["simulate-0", ...]).

    Repeats are in numeric order; a side without any `requests.parquet` is absent from the result.
    """
    base = run.path / "points" / point
    found: dict[str, list[str]] = {}
    for side in ("simulate", "live"):
        repeats = [d.name for d in base.glob(f"{side}-*")
                   if d.name.removeprefix(f"{side}-").isdigit() and (d / "requests.parquet").is_file()]
        if repeats:
            found[side] = sorted(repeats, key=lambda name: int(name.removeprefix(f"{side}-")))
        elif side == "simulate" and (base / "simulate" / "requests.parquet").is_file():
            found[side] = ["simulate"]
    return found


def ecdf(values: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    """Empirical CDF: sorted finite values and, for each, the fraction of values <= it (ties step once)."""
    x = np.sort(np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64))
    return x, np.arange(1, x.size + 1, dtype=np.float64) / max(x.size, 1)


def _ms(column: pd.Series) -> np.ndarray:
    """A per-request seconds column as finite milliseconds (None/NaN dropped)."""
    return pd.to_numeric(column, errors="coerce").dropna().to_numpy(dtype=np.float64) * MS


def _figure(num_panels: int, panel_size: tuple[float, float] = (4.4, 3.6)) -> tuple[Figure, list[Axes]]:
    """An Agg figure with `num_panels` axes: one row up to 3 panels, else two rows."""
    ncols = num_panels if num_panels <= 3 else math.ceil(num_panels / 2)
    nrows = math.ceil(num_panels / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    return fig, axes[:num_panels]


def _save(fig: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _legend(axes: Sequence[Axes]) -> None:
    """A legend on the first panel that has labelled artists (none if no panel has)."""
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
            return


def _mark_empty(ax: Axes) -> None:
    if not ax.lines and not ax.collections:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


# ---------------------------------------------------------------------------------------------- CDFs

def _draw_cdf(ax: Axes, side: str, repeats: list[np.ndarray]) -> None:
    """Each repeat thin (when there are several) and all repeats pooled thick, labelled with the side."""
    color = SIDE_COLORS[side]
    if len(repeats) > 1:
        for values in repeats:
            if values.size:
                ax.step(*ecdf(values), where="post", color=color, linewidth=0.8, alpha=0.35)
    pooled = np.concatenate(repeats) if repeats else np.empty(0)
    if pooled.size:
        ax.step(*ecdf(pooled), where="post", color=color, linewidth=2.0, label=SIDE_LABELS[side])


def plot_cdfs(run: RunData, point: str, out: Path) -> Path:
    """Write the per-request CDFs of `point` (TTFT, TPOT, end-to-end latency; ms) to `out` and return it.

    The simulator's values and the live ones (each repeat thin, all repeats pooled thick) share each panel.
    A missing side is simply not drawn; a panel without values says "no data".
    Raises FileNotFoundError if neither side of `point` has a requests.parquet.
    """
    sides = side_dirs(run, point)
    if not sides:
        raise FileNotFoundError(f"{run.path / 'points' / point}: no requests.parquet for any side")
    fig, axes = _figure(len(CDF_METRICS))
    for side, dirs in sides.items():
        frames = [run.requests(point, d) for d in dirs]
        for ax, (column, _) in zip(axes, CDF_METRICS):
            _draw_cdf(ax, side, [_ms(f[column]) for f in frames if column in f])
    for ax, (_, title) in zip(axes, CDF_METRICS):
        ax.set(title=title, xlabel=f"{title} (ms)", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        _mark_empty(ax)
    _legend(axes)
    fig.suptitle(f"{run.manifest.get('name', run.path.name)}: {point}")
    return _save(fig, out)


# ---------------------------------------------------------------------------------------------- sweeps

def _sweep_frame(run: RunData, x: str | None) -> tuple[pd.DataFrame, str, list[str]]:
    """The summary rows with an x column, the x column's name, and the other sweep keys (line groups).

    `x` None means the first sweep key, or the point's index when the run has no sweep.
    Raises ValueError if the summary is empty or `x` is not one of its columns.
    """
    frame = run.summary.copy()
    if frame.empty:
        raise ValueError(f"{run.path}: summary.csv is missing or empty")
    keys = [k for k in sweep_keys(run) if k in frame.columns]
    if x is None and keys:
        numeric = [k for k in keys if pd.api.types.is_numeric_dtype(frame[k])]
        x = RATE_KEY if RATE_KEY in numeric else (numeric or keys)[0]
    if x is None:
        index = {p["slug"]: p["index"] for p in run.manifest.get("points", [])}
        frame[POINT_INDEX] = frame["point"].map(index)
        return frame, POINT_INDEX, []
    if x not in frame.columns:
        raise ValueError(f"{x!r} is not a column of summary.csv (sweep keys: {keys})")
    return frame, x, [k for k in keys if k != x]


def _groups(frame: pd.DataFrame, by: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows) per combination of the `by` columns' values; one unlabelled group without `by`."""
    if not by:
        return [("", frame)]
    out = []
    for values, rows in frame.groupby(by, sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        out.append((", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(by, values)), rows))
    return out


def _draw_side(ax: Axes, rows: pd.DataFrame, x: str, metric: str, side: str, label: str, color: str) -> None:
    """One side's series: the value per x (median of repeats, min-max error bars when there are several)."""
    rows = rows[rows["side"] == side]
    if metric not in rows or rows[metric].isna().all():
        return
    stats = (rows.assign(_y=pd.to_numeric(rows[metric], errors="coerce") * scale_of(metric))
             .groupby(x, sort=True)["_y"].agg(["median", "min", "max", "count"]).dropna(subset=["median"]))
    if stats.empty:
        return
    style = dict(SIDE_STYLES[side], color=color, label=label)
    if (stats["count"] > 1).any():
        yerr = np.vstack([stats["median"] - stats["min"], stats["max"] - stats["median"]])
        ax.errorbar(stats.index, stats["median"], yerr=yerr, capsize=3, **style)
    else:
        ax.plot(stats.index, stats["median"], **style)


def _draw_panels(run: RunData, out: Path, x: str | None, panels: Sequence[tuple[str, str]],
                 sides: Sequence[str], title: str) -> Path:
    frame, xcol, others = _sweep_frame(run, x)
    groups = _groups(frame, others)
    fig, axes = _figure(len(panels))
    for ax, (metric, ylabel) in zip(axes, panels):
        for g, (glabel, rows) in enumerate(groups):
            for side in sides:
                color = f"C{g}" if len(groups) > 1 else SIDE_COLORS[side]
                label = glabel if glabel and len(sides) == 1 else SIDE_LABELS[side] + (f" ({glabel})" if glabel else "")
                _draw_side(ax, rows, xcol, metric, side, label, color)
        ax.set(xlabel=xcol, ylabel=ylabel)
        ax.grid(alpha=0.3)
        _mark_empty(ax)
    _legend(axes)
    fig.suptitle(title)
    return _save(fig, out)


def plot_latency_vs(run: RunData, out: Path, x: str | None = None) -> Path:
    """Write mean TTFT, p90 TTFT and mean TPOT (ms) against sweep key `x` to `out` and return it.

    `x` defaults to the first sweep key, or the point index when the run has no sweep. The simulator is a
    line with markers; live is the median of the repeats with min-max error bars. With several sweep keys,
    each combination of the other keys is its own pair of series. Raises ValueError if the summary is
    empty or `x` is not a summary column.
    """
    name = run.manifest.get("name", run.path.name)
    return _draw_panels(run, out, x, LATENCY_PANELS, ("simulate", "live"), f"{name}: predicted vs measured")


def plot_sweep(run: RunData, out: Path, x: str | None = None, side: str = "simulate",
               panels: Sequence[tuple[str, str]] = SWEEP_PANELS) -> Path:
    """Write each metric of `panels` against sweep key `x` for one `side` to `out` and return it.

    `x` defaults as in `plot_latency_vs`. One line per combination of the other sweep keys (e.g. one per
    `max_num_seqs` in a rate x max_num_seqs grid); a live side is the median of its repeats with min-max
    error bars. Latencies are drawn in ms. Raises ValueError as `plot_latency_vs`.
    """
    name = run.manifest.get("name", run.path.name)
    return _draw_panels(run, out, x, panels, (side,), f"{name}: {side}")


def plot_goodput_vs(run: RunData, out: Path, x: str | None = None) -> Path:
    """Write goodput (req/s meeting the SLOs), mean TTFT and mean TPOT against sweep key `x`, one
    colour per combination of the other sweep keys (e.g. per scheduling mode), both sides, to `out`."""
    name = run.manifest.get("name", run.path.name)
    sides = tuple(s for s in ("simulate", "live") if (run.summary["side"] == s).any())
    slo_keys = [k for k in sweep_keys(run) if k.startswith("slo.") and k in run.summary.columns]
    if not slo_keys:
        return _draw_panels(run, out, x, GOODPUT_PANELS, sides, f"{name}: goodput")
    # A sweep over an SLO: one goodput panel per objective, one line per other setting.
    frame, xcol, others = _sweep_frame(run, x)
    key = slo_keys[0]
    values = sorted(frame[key].dropna().unique())
    fig, axes = _figure(len(values))
    for ax, value in zip(axes, values):
        groups = _groups(frame[frame[key] == value], [k for k in others if k != key])
        for g, (glabel, rows) in enumerate(groups):
            for side in sides:
                label = glabel if len(sides) == 1 else f"{SIDE_LABELS[side]} ({glabel})"
                _draw_side(ax, rows, xcol, "goodput", side, label, f"C{g}")
        ax.set(xlabel=xcol, ylabel="goodput (req/s)", title=f"{key.split('.', 1)[1]} = {value:g}")
        ax.grid(alpha=0.3)
        _mark_empty(ax)
    _legend(axes)
    fig.suptitle(f"{name}: goodput")
    return _save(fig, out)


def write_plots(run_dir: Path) -> list[Path]:
    """Write `plots/cdf_<slug>.png` per point, `plots/latency_vs_<key>.png` (with a live side) and
    `plots/goodput_vs_<key>.png` (with SLOs) into a run; return the paths.

    `<key>` is the last part of the first numeric sweep key (`point` without a sweep). `run_dir` may also be
    `results/<name>` (its newest run). Points without per-request data and an empty summary are skipped.
    """
    run = load_run(run_dir)
    plots = run.path / "plots"
    paths = [plot_cdfs(run, p, plots / f"cdf_{p}.png") for p in run.points if side_dirs(run, p)]
    if not run.summary.empty:
        frame, xcol, _ = _sweep_frame(run, None)
        key = xcol.rsplit(".", 1)[-1] if xcol != POINT_INDEX else "point"
        if (frame["side"] == "live").any():
            paths.append(plot_latency_vs(run, plots / f"latency_vs_{key}.png"))
        if "goodput" in frame.columns and frame["goodput"].notna().any():
            paths.append(plot_goodput_vs(run, plots / f"goodput_vs_{key}.png"))
    return paths


# ---------------------------------------------------------------------------------------------- tables

def format_fidelity(fidelity: pd.DataFrame) -> pd.DataFrame:
    """The fidelity table for display: latencies in ms, a unit column, errors and tolerances in %.

    Keeps `point`, the sweep-key columns and `metric`; the returned frame is a new one.
    """
    table = fidelity.copy()
    scale = table["metric"].map(scale_of)
    for column in ("predicted", "measured", "measured_min", "measured_max"):
        table[column] = pd.to_numeric(table[column], errors="coerce") * scale
    table.insert(table.columns.get_loc("metric") + 1, "unit", table["metric"].map(unit_of))
    table["relative_error"] = pd.to_numeric(table["relative_error"], errors="coerce") * 100
    table["tolerance"] = pd.to_numeric(table["tolerance"], errors="coerce") * 100
    return table.rename(columns={"measured_min": "live min", "measured_max": "live max",
                                 "relative_error": "error %", "tolerance": "tolerance %"})


def to_display_units(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """`frame` (summary rows) with latency columns in ms, renamed `<metric> (ms)`; optionally only `columns`.

    Non-metric columns (point, side, sweep keys) pass through unchanged.
    """
    table = frame[list(columns)] if columns is not None else frame
    renames: dict[str, Any] = {}
    table = table.copy()
    for column in table.columns:
        if is_latency(column):
            table[column] = pd.to_numeric(table[column], errors="coerce") * MS
            renames[column] = f"{column} (ms)"
    return table.rename(columns=renames)
