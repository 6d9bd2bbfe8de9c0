"""experiments/plots.py and the notebooks, on small synthetic results folders shaped like the runner's.

The folders are written without the runner: synthetic per-request records (seeded numpy RNG) go through
the real writers and metrics (`write_side`, `summarize`, `compare`), and the manifest, summary.csv and
fidelity.csv follow the results-folder contract of `experiments.results`.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from experiments import plots
from experiments.fidelity import FIDELITY_METRICS, compare
from experiments.results import load_run, write_side
from sagellm.metrics.records import RequestRecord
from sagellm.metrics.summary import SLO, summarize

REPO_ROOT = Path(__file__).resolve().parents[1]
RATE = "workload.arrival.rate"
SEQS = "sagellm.scheduler.max_num_seqs"
POLICY = "sagellm.scheduler.policy"
SLO_S = SLO(ttft=2.0, tpot=0.3)
NUM_REQUESTS = 30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- synthetic runs

Workload = tuple[np.ndarray, np.ndarray, np.ndarray]


def synthetic_workload(rng: np.random.Generator, rate: float) -> Workload:
    """NUM_REQUESTS Poisson arrivals at `rate` req/s with prompt and output lengths (one trace per point).

    The first request has a single output token, so its TPOT is None (as in real runs).
    """
    outputs = rng.integers(2, 120, NUM_REQUESTS)
    outputs[0] = 1
    return np.cumsum(rng.exponential(1.0 / rate, NUM_REQUESTS)), rng.integers(50, 400, NUM_REQUESTS), outputs


def synthetic_records(rng: np.random.Generator, workload: Workload, slowdown: float,
                      tenants: bool = False) -> list[RequestRecord]:
    """Plausible records of one side serving `workload`; `slowdown` stretches queueing and decode times.
    With `tenants`, every fifth request is tenant "light", the others "heavy"."""
    arrivals, prompts, outputs = workload
    rate = NUM_REQUESTS / arrivals[-1]
    records = []
    for i, (arrival, prompt, out) in enumerate(zip(arrivals, prompts, outputs)):
        queue = rng.exponential(0.05 * rate) * slowdown
        ttft = queue + 0.02 + prompt * 1e-4
        tpot = abs(rng.normal(0.04, 0.005)) * slowdown if out > 1 else None
        e2e = ttft + (tpot or 0.0) * (out - 1)
        records.append(RequestRecord(
            request_id=f"r{i}", replica=0, arrival_time=float(arrival),
            first_scheduled_time=float(arrival + queue), first_token_time=float(arrival + ttft),
            finish_time=float(arrival + e2e), num_prompt_tokens=int(prompt), num_output_tokens=int(out),
            num_preemptions=0, finish_reason="length", queueing_delay=float(queue), ttft=float(ttft),
            tpot=tpot, e2e_latency=float(e2e), itl_max=None if tpot is None else 1.5 * tpot,
            tenant=("light" if i % 5 == 0 else "heavy") if tenants else ""))
    return records


def _slug(index: int, overrides: dict[str, Any]) -> str:
    """Same format as experiments.config.SweepPoint.slug."""
    return f"{index:03d}_" + "_".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items())


def _side(run_dir: Path, slug: str, side: str, records: list[RequestRecord]) -> dict[str, float]:
    itls = [r.tpot for r in records if r.tpot is not None]
    summary = summarize(records, itls, SLO_S)
    write_side(run_dir / "points" / slug / side, records, summary)
    return summary


def make_run(root: Path, name: str, sweep: dict[str, list], repeats: int, seed: int = 0,
             tenants: bool = False) -> Path:
    """Write `root/<name>/<time>/` with simulate plus `repeats` live repeats per sweep point; return it."""
    rng = np.random.default_rng(seed)
    run_dir = root / name / "20250101T000000Z"
    points, summary_rows, fidelity_rows = [], [], []
    for index, values in enumerate(itertools.product(*sweep.values())):
        overrides = dict(zip(sweep, values))
        slug = _slug(index, overrides)
        points.append({"index": index, "slug": slug, "overrides": overrides})
        workload = synthetic_workload(rng, float(overrides[RATE]))
        predicted = _side(run_dir, slug, "simulate", synthetic_records(rng, workload, 1.0, tenants))
        summary_rows.append({"point": slug, "side": "simulate", "repeat": -1, **overrides, **predicted})
        measured = []
        for r in range(repeats):
            measured.append(_side(run_dir, slug, f"live-{r}",
                                  synthetic_records(rng, workload, 1.1 + 0.05 * r, tenants)))
            summary_rows.append({"point": slug, "side": "live", "repeat": r, **overrides, **measured[-1]})
        fidelity_rows += [{"point": slug, **overrides, **row.to_dict()} for row in compare(predicted, measured)]
    sides = ["simulate", "live"] if repeats else ["simulate"]
    manifest = {"name": name, "description": "synthetic test run", "sides": sides, "sweep": sweep,
                "points": points, "config": {"name": name, "sweep": sweep}, "git_revision": "0" * 40,
                "machine": {"cpu": "test"}, "versions": {"python": "3.11"}, "created": "2025-01-01T00:00:00+00:00"}
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    pd.DataFrame(summary_rows).to_csv(run_dir / "summary.csv", index=False)
    if repeats:
        pd.DataFrame(fidelity_rows).to_csv(run_dir / "fidelity.csv", index=False)
    (run_dir / "plots").mkdir()
    return run_dir


@pytest.fixture
def fidelity_run(tmp_path: Path) -> Path:
    return make_run(tmp_path, "quickstart", {RATE: [0.5, 1.0]}, repeats=2, seed=1)


@pytest.fixture
def grid_run(tmp_path: Path) -> Path:
    return make_run(tmp_path, "grid", {RATE: [0.5, 1.0], SEQS: [4, 16]}, repeats=0, seed=2)


@pytest.fixture
def policy_run(tmp_path: Path) -> Path:
    return make_run(tmp_path, "policies", {POLICY: ["fcfs", "sjf", "fair"], RATE: [0.5, 1.0]}, repeats=2, seed=3,
                    tenants=True)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"


# ---------------------------------------------------------------------------------------------- plots.py

def test_ecdf_sorts_drops_missing_and_reaches_one() -> None:
    x, y = plots.ecdf([3.0, None, 1.0, float("nan"), 2.0])
    assert x.tolist() == [1.0, 2.0, 3.0]
    assert y.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert plots.ecdf([])[0].size == 0


def test_side_dirs_finds_both_sides_in_repeat_order(fidelity_run: Path) -> None:
    run = load_run(fidelity_run)
    assert plots.side_dirs(run, run.points[0]) == {"simulate": ["simulate"], "live": ["live-0", "live-1"]}
    # One simulation per live run (paired serving references): those, in repeat order.
    base = fidelity_run / "points" / run.points[0]
    for k in (1, 0):
        shutil.copytree(base / "simulate", base / f"simulate-{k}")
    assert plots.side_dirs(run, run.points[0])["simulate"] == ["simulate-0", "simulate-1"]


def test_plot_cdfs_writes_png(fidelity_run: Path, tmp_path: Path) -> None:
    run = load_run(fidelity_run)
    out = plots.plot_cdfs(run, run.points[0], tmp_path / "out" / "cdf.png")
    assert out == tmp_path / "out" / "cdf.png"
    assert_png(out)


def test_plot_cdfs_with_a_missing_side(fidelity_run: Path, tmp_path: Path) -> None:
    run = load_run(fidelity_run)
    point = run.points[1]
    for live in (fidelity_run / "points" / point).glob("live-*"):
        shutil.rmtree(live)
    assert plots.side_dirs(run, point) == {"simulate": ["simulate"]}
    assert_png(plots.plot_cdfs(run, point, tmp_path / "sim_only.png"))
    shutil.rmtree(fidelity_run / "points" / point / "simulate")
    with pytest.raises(FileNotFoundError):
        plots.plot_cdfs(run, point, tmp_path / "nothing.png")


def test_plot_latency_vs_default_and_explicit_key(fidelity_run: Path, tmp_path: Path) -> None:
    run = load_run(fidelity_run)
    assert_png(plots.plot_latency_vs(run, tmp_path / "default.png"))
    assert_png(plots.plot_latency_vs(run, tmp_path / "rate.png", x=RATE))
    with pytest.raises(ValueError, match="not a column"):
        plots.plot_latency_vs(run, tmp_path / "bad.png", x="workload.no_such_key")


def test_plot_latency_vs_without_sweep_uses_point_index(fidelity_run: Path, tmp_path: Path) -> None:
    run = load_run(fidelity_run)
    run.manifest["sweep"] = {}
    run.summary = run.summary.drop(columns=[RATE])
    frame, x, others = plots._sweep_frame(run, None)
    assert x == plots.POINT_INDEX and others == []
    assert sorted(frame[x].unique().tolist()) == [0, 1]
    assert_png(plots.plot_latency_vs(run, tmp_path / "by_index.png"))


def test_plot_sweep_groups_by_the_other_key(grid_run: Path, tmp_path: Path) -> None:
    run = load_run(grid_run)
    frame, x, others = plots._sweep_frame(run, RATE)
    assert (x, others) == (RATE, [SEQS])
    assert [label for label, _ in plots._groups(frame, others)] == ["max_num_seqs=4", "max_num_seqs=16"]
    for key in (RATE, SEQS):
        assert_png(plots.plot_sweep(run, tmp_path / f"{key}.png", x=key))


def test_write_plots_writes_every_point_and_the_sweep(fidelity_run: Path) -> None:
    run = load_run(fidelity_run)
    paths = plots.write_plots(fidelity_run.parent)  # results/<name>: its newest run
    expected = [fidelity_run / "plots" / f"cdf_{p}.png" for p in run.points]
    assert paths == [*expected, fidelity_run / "plots" / "latency_vs_rate.png",
                     fidelity_run / "plots" / "goodput_vs_rate.png"]
    for path in paths:
        assert_png(path)


def test_format_fidelity_units(fidelity_run: Path) -> None:
    raw = load_run(fidelity_run).fidelity
    table = plots.format_fidelity(raw)
    assert set(raw["metric"]) == set(FIDELITY_METRICS) - {"handoff_mean_s"}  # no hand-offs here
    ttft = raw["metric"] == "ttft_mean"
    thr = raw["metric"] == "request_throughput"
    assert table.loc[ttft, "predicted"].tolist() == pytest.approx((raw.loc[ttft, "predicted"] * 1e3).tolist())
    assert table.loc[thr, "measured"].tolist() == pytest.approx(raw.loc[thr, "measured"].tolist())
    assert table["error %"].tolist() == pytest.approx((raw["relative_error"] * 100).tolist())
    assert set(table.loc[ttft, "unit"]) == {"ms"} and set(table.loc[thr, "unit"]) == {"req/s"}
    assert RATE in table.columns and "measured_min" not in table.columns


def test_to_display_units_converts_only_latencies(grid_run: Path) -> None:
    summary = load_run(grid_run).summary
    table = plots.to_display_units(summary, ["point", RATE, "ttft_p90", "goodput"])
    assert list(table.columns) == ["point", RATE, "ttft_p90 (ms)", "goodput"]
    assert table["ttft_p90 (ms)"].tolist() == pytest.approx((summary["ttft_p90"] * 1e3).tolist())
    assert table["goodput"].tolist() == pytest.approx(summary["goodput"].tolist())


# ---------------------------------------------------------------------------------------------- notebooks

@pytest.fixture
def python3_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a kernel running this interpreter: "python3", installed into a tmp prefix if missing."""
    from jupyter_client.kernelspec import find_kernel_specs

    if "python3" not in find_kernel_specs():
        from ipykernel.kernelspec import install

        prefix = tmp_path / "jupyter-prefix"
        install(kernel_name="python3", prefix=str(prefix))
        monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    return "python3"


def execute_notebook(name: str, results: Path, kernel: str, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Run notebooks/<name> against `results` (via SAGELLM_RESULTS); return its code cells' outputs.

    Fails on the first erroring cell (nbclient raises CellExecutionError).
    """
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SAGELLM_RESULTS", str(results))
    monkeypatch.setenv("MPLBACKEND", "agg")
    nb = nbformat.read(REPO_ROOT / "notebooks" / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: outputs not cleared"
    NotebookClient(nb, timeout=120, kernel_name=kernel, resources={"metadata": {"path": str(REPO_ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def _text(outputs: list[dict]) -> str:
    parts = []
    for o in outputs:
        parts.append(o.get("text", ""))
        data = o.get("data", {})
        parts += [data.get("text/plain", ""), data.get("text/html", "")]
    return "\n".join(parts)


def _num_images(outputs: list[dict]) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


def test_fidelity_notebook_runs(fidelity_run: Path, python3_kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = execute_notebook("fidelity.ipynb", fidelity_run.parent, python3_kernel, monkeypatch)
    text = _text(outputs)
    present = set(load_run(fidelity_run).fidelity["metric"])
    assert present >= set(FIDELITY_METRICS) - {"handoff_mean_s"}  # no hand-offs without mode strict
    for metric in present:
        assert metric in text, f"fidelity notebook output lacks {metric}"
    assert str(fidelity_run) in text  # resolved the newest run of results/<name>
    assert _num_images(outputs) >= len(load_run(fidelity_run).points) + 1
    assert sorted(p.name for p in (fidelity_run / "plots").glob("*.png")) == [
        "cdf_000_rate=0.5.png", "cdf_001_rate=1.0.png", "goodput_vs_rate.png", "latency_vs_rate.png"]


def test_policies_notebook_runs(grid_run: Path, python3_kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = execute_notebook("policies.ipynb", grid_run, python3_kernel, monkeypatch)
    text = _text(outputs)
    for column in ("ttft_mean (ms)", "tpot_mean (ms)", "output_throughput", "goodput", SEQS):
        assert column in text, f"policies notebook output lacks {column}"
    assert _num_images(outputs) >= 2  # one figure per sweep key


def test_policies_notebook_compares_the_sides_and_the_tenants(policy_run: Path, python3_kernel: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    text = _text(execute_notebook("policies.ipynb", policy_run, python3_kernel, monkeypatch))
    for expected in ("pairs_that_differ", "same_order", "ratios to fcfs", "predicted", "measured",
                     "tenant_light_ttft_mean", "tenant_heavy_service_share"):
        assert expected in text, f"policies notebook output lacks {expected}"


# ---------------------------------------------------------------------------------------------- compare_policies


def _sides(rows: list[tuple[str, float, float, float]]) -> pd.DataFrame:
    """A side table of one metric, ttft_mean: (policy, simulated, live median, live spread) per point."""
    return pd.DataFrame([{"point": f"{i:03d}", POLICY: p, "ttft_mean_sim": s, "ttft_mean_live": m,
                          "ttft_mean_spread": w, "live_repeats": 2} for i, (p, s, m, w) in enumerate(rows)])


def test_rank_checks_count_only_pairs_that_differ_beyond_their_spread() -> None:
    from experiments.compare_policies import rank_checks

    table = _sides([("fcfs", 2.0, 2.0, 0.1), ("sjf", 1.0, 1.0, 0.1), ("fair", 3.0, 2.05, 0.2),
                    ("priority", 0.5, 3.0, 0.1)])
    (check,) = rank_checks(table, POLICY, ["ttft_mean"])
    # fcfs and fair are 0.05 apart, within fair's spread (0.2): not counted; the other 5 pairs differ
    assert check.pairs_that_differ == 5
    # priority is measured slowest but simulated fastest: its 3 pairs disagree; fcfs-sjf and sjf-fair agree
    assert check.same_order == 2 and len(check.disagreements) == 3


def test_baseline_ratios_divide_by_the_baseline_of_the_same_group() -> None:
    from experiments.compare_policies import baseline_ratios

    table = _sides([("fcfs", 2.0, 4.0, 0.1), ("sjf", 1.0, 3.0, 0.1)])
    table["workload.arrival.rate"] = 0.5
    ratios = baseline_ratios(table, POLICY, "fcfs", ["ttft_mean"])
    sjf = ratios[ratios[POLICY] == "sjf"].iloc[0]
    assert (sjf.predicted, sjf.measured) == (0.5, 0.75) and sjf.error == pytest.approx(0.5 / 0.75 - 1)
