"""Runs an experiment: every sweep point on every side, results to `results/<name>/<UTC time>/`.

A run can be resumed (`resume=` the run folder): points with a `done.json` are read back, not
redone. Live points share one engine while the engine's settings stay the same.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.config import ExperimentConfig, SweepPoint
from experiments.fidelity import compare, format_table
from experiments.results import IDLE_PROBE_FILE, read_steps, step_batches, write_side
from sagellm.config import ConfigError
from sagellm.metrics.io import format_summary, jsonable
from simulator.cost.profiled import BAND_KEYS, SERVING_KINDS
from simulator.workloads import generate

PACKAGES = ("torch", "simpy", "numpy", "pandas", "gguf", "transformers", "pyarrow", "matplotlib")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run_experiment`: the points finished so far are kept in `run_dir`, and
    `run_experiment(..., resume=run_dir)` (`--resume` on the command line) continues from there."""

    def __init__(self, run_dir: Path, finished: int, total: int) -> None:
        super().__init__(f"interrupted: {finished} of {total} points finished and kept in {run_dir}")
        self.run_dir, self.finished, self.total = run_dir, finished, total


def run_experiment(cfg: ExperimentConfig, results_root: Path = Path("results"), resume: Path | None = None,
                   echo: Callable[[str], None] = print, progress: bool = True, resimulate: bool = False) -> Path:
    """Run (or resume) `cfg`; returns the run folder. Prints each point's summary and fidelity table.

    With `resimulate` (and `resume`), finished points keep their live runs but the simulator runs
    again, with today's cost model, and the fidelity tables are recomputed: how a better model
    does against the same measurements.
    """
    if resume is not None:
        run_dir = Path(resume)
        old = run_dir / "manifest.json"
        if not old.exists():
            raise ConfigError(f"resume: {run_dir} is not a run folder (no manifest.json)")
        if _what_is_measured(json.loads(old.read_text())["config"]) != _what_is_measured(_jsonable_config(cfg.raw)):
            raise ConfigError(f"resume: the experiment file changed since {run_dir} started (beyond "
                              f"live.{', live.'.join(_HOW_TO_MEASURE)}); start a new run")
    else:
        run_dir = Path(results_root) / cfg.name / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "manifest.json").write_text(json.dumps(_manifest(cfg), indent=2, sort_keys=True) + "\n")
    if "simulate" in cfg.sides:
        _ensure_profiles(cfg, echo)

    live = _LivePool(cfg)
    rows: list[dict[str, Any]] = []
    fidelity_rows: list[dict[str, Any]] = []
    try:
        for point in cfg.points:
            pdir = run_dir / "points" / point.slug
            done = pdir / "done.json"
            if done.exists() and resimulate and "simulate" in cfg.sides:
                doc = _resimulate_point(cfg, point, pdir, json.loads(done.read_text()), echo, progress)
                done.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            elif done.exists():
                echo(f"[{point.slug}] done earlier, skipped")
                doc = json.loads(done.read_text())
            else:
                doc = _run_point(cfg, point, pdir, live, echo, progress)
                done.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            base = {"point": point.slug, **point.labels}
            for side in doc["sides"]:
                rows.append({**base, "side": side["side"], "repeat": side["repeat"], "cpu_steal": side.get("cpu_steal"),
                             **side["summary"]})
            fidelity_rows += [{**base, **f} for f in doc.get("fidelity", [])]
    except KeyboardInterrupt:
        finished = sum((run_dir / "points" / p.slug / "done.json").exists() for p in cfg.points)
        raise RunInterrupted(run_dir, finished, len(cfg.points)) from None
    finally:
        live.close()
    pd.DataFrame(rows).to_csv(run_dir / "summary.csv", index=False)
    if fidelity_rows:
        pd.DataFrame(fidelity_rows).to_csv(run_dir / "fidelity.csv", index=False)
    try:
        from experiments.plots import write_plots

        for p in write_plots(run_dir):
            echo(f"plot: {p}")
    except ImportError:
        pass
    echo(f"results: {run_dir}")
    return run_dir


def _run_point(cfg: ExperimentConfig, point: SweepPoint, pdir: Path, live: _LivePool,
               echo: Callable[[str], None], progress: bool) -> dict[str, Any]:
    sim_cfg = point.simulation
    title = f"[{point.slug}]"
    sides: list[dict[str, Any]] = []
    measured = []
    probes: list[float] = []
    reference = None
    cost_model = _profiled_cost_model(point) if "simulate" in cfg.sides else None
    # The live side runs first so that its serving references (or speed probes) can set the simulator's step speed.
    if "live" in cfg.sides:
        trace = list(generate(sim_cfg.workload, sim_cfg.base_dir))
        reference = (reference_trace(sim_cfg.workload, sim_cfg.base_dir, cfg.live.serving_reference_s,
                                     cfg.live.serving_reference_requests)
                     if cfg.live.serving_reference and cost_model is not None else None)
        runner = live.get(sim_cfg)
        probe = cfg.live.speed_probe and cost_model is not None
        limit = cfg.live.max_cpu_steal
        attempt = 0
        after_ref = None  # the reference served after the previous attempt: this attempt's reference before it
        while len(measured) < cfg.live.repeats:
            if attempt >= cfg.live.max_attempts:
                raise RuntimeError(
                    f"{title} only {len(measured)} of {cfg.live.repeats} live runs lost less than {limit:.0%} of their "
                    f"CPU to other VMs in {attempt} attempts; the machine is too noisy to measure now")
            before = _probe_when_quiet(runner, cost_model, cfg.live, title, echo) if probe else None
            before_steps = _probe_steps(runner, cost_model) if probe else None
            ref = after_ref or (runner.run(reference, None, cfg.live.timeout_s) if reference else None)
            res = runner.run(trace, sim_cfg.slo.to_slo(), cfg.live.timeout_s)
            after = cost_model.speed_factor(runner.probe()) if probe else None
            after_ref = (runner.run(reference, None, cfg.live.timeout_s)
                         if reference and cfg.live.serving_reference_after else None)
            steal = res.info.get("cpu_steal")
            counted = limit is None or steal is None or steal <= limit
            if probe:
                res.info["speed_factor_before"], res.info["speed_factor_after"] = before, after
                res.info["speed_probe_before"] = before_steps
                res.info["speed_probe_after"] = _probe_steps(runner, cost_model)
            r = len(measured)
            name = f"live-{r}" if counted else f"rejected-{attempt}"
            if ref is not None:
                for sub, served in ((REFERENCE_DIR, ref), (REFERENCE_AFTER_DIR, after_ref)):
                    if served is not None:
                        write_side(pdir / name / sub, served.records, served.summary, served.info, steps=served.steps,
                                   probe=served.probe)
                res.info["serving_reference"] = _reference_factors(
                    _reference_frames(pdir / name), cost_model,
                    _handoff_link(sim_cfg.sagellm, cost_model, _reference_handoffs(pdir / name)))
            write_side(pdir / name, res.records, res.summary, res.info, steps=res.steps, probe=res.probe)
            attempt += 1
            echo(f"{title} live run {attempt}: TTFT mean {res.summary['ttft_mean'] * 1e3:.0f} ms, "
                 f"TPOT mean {res.summary['tpot_mean'] * 1e3:.1f} ms, {res.summary['request_throughput']:.3f} req/s"
                 + ("" if steal is None else f", CPU stolen by other VMs {steal:.1%}")
                 + ("" if not probe else f", machine speed vs profile {before:.2f}x before, {after:.2f}x after")
                 + ("" if ref is None else ", serving reference " + _describe_reference(res.info["serving_reference"]))
                 + ("" if counted else f" > {limit:.0%}: not counted, run again"))
            if counted:
                measured.append(res.summary)
                if probe:
                    probes += [before, after]
                sides.append({"side": "live", "repeat": r, "cpu_steal": steal, "summary": _clean(res.summary)})
    doc: dict[str, Any] = {"point": point.slug, "overrides": point.overrides, "sides": sides}
    if probes:
        doc["speed_factor"] = statistics.median(probes)
        doc["speed_probes"] = probes
    if reference and sides:
        doc["serving_reference"] = _point_reference(pdir, doc, cost_model, sim_cfg.sagellm)
    if "simulate" in cfg.sides:
        _simulate_point(point, pdir, doc, cost_model, echo, progress, "simulated", cfg.live.reference_prediction)
    return doc


REFERENCE_DIR = "reference"
REFERENCE_AFTER_DIR = "reference-after"


def _reference_frames(run_dir: Path) -> list[pd.DataFrame]:
    """The steps of a live run's stored serving references: the one before it, and the one after
    it when there is one (`live.serving_reference_after`); empty frames are left out."""
    frames = [read_steps(run_dir / sub) for sub in (REFERENCE_DIR, REFERENCE_AFTER_DIR) if (run_dir / sub).is_dir()]
    return [frame for frame in frames if not frame.empty]


def _idle_probe_pricing(run_dir: Path) -> tuple[list[pd.DataFrame], dict[str, Any]] | None:
    """With the idle speed probe's timings stored for a live run and each of its references
    (`live.idle_speed_probe`): the references' steps with each step's seconds divided by the
    machine's speed multiplier when it started (the reference's `SpeedTrace` against the nominal
    probe time, the median of all the references' timings), and the run's own speed trace against
    that nominal, as {"nominal_s", "window_s", "starts", "multipliers"}. The step time a reference
    measured at nominal speed then prices the run's steps at the speed the probe saw at each moment
    of it. None when the run or a reference has too few timings."""
    from experiments.results import read_idle_probe
    from simulator.speed_trace import WINDOW_S, SpeedTrace

    subs = [sub for sub in (REFERENCE_DIR, REFERENCE_AFTER_DIR) if not read_steps(run_dir / sub).empty]
    probes = [read_idle_probe(run_dir / sub) for sub in subs]
    run_probe = read_idle_probe(run_dir)
    if not subs or run_probe.empty or any(p.empty for p in probes):
        return None
    nominal = float(pd.concat(probes)["seconds"].median())
    frames = []
    for sub, probe in zip(subs, probes):
        trace = SpeedTrace.from_probe(probe["end_time"].tolist(), probe["seconds"].tolist(), nominal)
        if trace is None:
            return None
        steps = read_steps(run_dir / sub).copy()
        starts = (steps["end_time"] - steps["seconds"]).tolist()
        steps["seconds"] = [s / trace.at(t) for s, t in zip(steps["seconds"], starts)]
        frames.append(steps)
    run_trace = SpeedTrace.from_probe(run_probe["end_time"].tolist(), run_probe["seconds"].tolist(), nominal)
    if run_trace is None:
        return None
    return frames, {"nominal_s": nominal, "window_s": WINDOW_S, "starts": list(run_trace.starts),
                    "multipliers": list(run_trace.multipliers)}


def _speed_of(reference: dict[str, Any]):
    """The `SpeedTrace` a paired reference prices its run with (`_idle_probe_pricing`), or None."""
    from simulator.speed_trace import SpeedTrace

    trace = reference.get("speed_trace")
    return SpeedTrace(trace["starts"], trace["multipliers"]) if trace else None


def _reference_handoffs(run_dir: Path) -> list:
    """The (bytes, seconds) hand-offs timed in a live run's stored serving references."""
    handoffs = []
    for sub in (REFERENCE_DIR, REFERENCE_AFTER_DIR):
        if (run_dir / sub / "summary.json").exists():
            handoffs += json.loads((run_dir / sub / "summary.json").read_text()).get("info", {}).get("handoffs", [])
    return handoffs


def reference_trace(workload, base_dir: Path, seconds: float, requests: int = 0) -> list:
    """The serving reference's requests: those of another sample of `workload` (seed + 1) that
    arrive in its first `seconds` (at least the first one), or with `requests` > 0 its first
    `requests` (all of them when it has fewer); ids prefixed "ref-"."""
    from dataclasses import replace

    sample = generate(replace(workload, seed=workload.seed + 1), base_dir)
    trace = []
    for tr in sample:
        if requests and len(trace) >= requests:
            break
        if not requests and trace and tr.arrival_time - trace[0].arrival_time >= seconds:
            break
        trace.append(replace(tr, request_id=f"ref-{tr.request_id}"))
    if not trace:
        field = "serving_reference_requests" if requests else "serving_reference_s"
        raise ConfigError(f"live.{field}: the workload has no requests to serve as a reference")
    return trace


def _handoff_link(sagellm_cfg, cost_model, handoffs: list) -> dict[str, Any] | None:
    """The serving factor of the KV hand-off link from hand-offs timed while serving ((bytes,
    seconds) pairs): measured / the link's fitted time, summed, where a layer-wise hand-off's
    fitted time is that of its last layer's piece plus the link latency (the part left after the
    prefill step, as `simulator.pd_cluster.HandoffLink` prices it). None without hand-offs or
    without a calibrated link."""
    from sagellm.engine.pd_calibration import LINK_NAMES, handoff_serving_factor

    if not handoffs:
        return None
    layerwise = sagellm_cfg.kv_cache.granularity == "layer"
    name = LINK_NAMES["layer" if layerwise else "block"]
    if name not in cost_model.kv_links and layerwise:
        name = LINK_NAMES["block"]
    link = cost_model.kv_links.get(name)
    if link is None:
        return None
    share = 1.0 / cost_model.shape.num_layers if layerwise else 1.0
    return {"name": name, "serving_factor": handoff_serving_factor(link, handoffs, share), "handoffs": len(handoffs)}


def _reference_factors(frames: list[pd.DataFrame], cost_model, link: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """Serving factors of reference steps: measured / profiled (grid) time, for all steps, per
    kind (a kind with too few steps takes the factor of all) and per decode row band with enough
    steps (`ProfiledCostModel.serving_factors_of`), and how many steps there were; with
    `link` (`_handoff_link`), the hand-off link's factor as `handoff_link`."""
    batches, seconds = [], []
    for frame in frames:
        b, s = step_batches(frame)
        batches += b
        seconds += s
    if not batches:
        raise RuntimeError("the serving reference ran no steps")
    factors, _ = cost_model.serving_factors_of(batches, seconds, [], [])
    out: dict[str, Any] = {**factors, "steps": len(batches)}
    if link is not None:
        out["handoff_link"] = link
    return out


def _describe_reference(ref: dict[str, Any]) -> str:
    text = f"{ref['decode']:.2f}x decode, {ref['prefill']:.2f}x prefill steps ({ref['steps']} steps)"
    trace = ref.get("speed_trace", False)
    if trace:
        text += (f" at the idle probe's nominal speed; the run's speed "
                 f"{min(trace['multipliers']):.2f}-{max(trace['multipliers']):.2f}x of it")
    elif trace is None:
        text += "; the idle probe had too few timings, so without it"
    bands = [key.removeprefix("decode_rows_") for key in BAND_KEYS if key in ref]
    if bands:
        text += f", decode rows {'/'.join(bands)} {'/'.join(f'{ref[k]:.2f}' for k in BAND_KEYS if k in ref)}x"
    link = ref.get("handoff_link")
    if link:
        text += f", {link['serving_factor']:.2f}x the {link['name']} link ({link['handoffs']} hand-offs)"
    return text


def _stored_references(pdir: Path, doc: dict[str, Any]) -> list[tuple[int, list[pd.DataFrame], list]] | None:
    """(repeat, reference steps, reference hand-offs) of each counted live run of the point, with
    the steps and hand-offs of its references before and (if stored) after it; None when a counted
    run has no stored reference before it (or there is no counted run)."""
    out = []
    for side in doc["sides"]:
        if side["side"] != "live":
            continue
        run_dir = pdir / f"live-{side['repeat']}"
        if read_steps(run_dir / REFERENCE_DIR).empty:
            return None
        out.append((side["repeat"], _reference_frames(run_dir), _reference_handoffs(run_dir)))
    return out or None


def _point_reference(pdir: Path, doc: dict[str, Any], cost_model, sagellm_cfg) -> dict[str, Any] | None:
    """The serving factors of the point's counted live runs' reference steps (and hand-offs),
    pooled; None when a counted run has no stored reference."""
    stored = _stored_references(pdir, doc)
    if stored is None:
        return None
    handoffs = [h for _, _, hs in stored for h in hs]
    return _reference_factors([frame for _, frames, _ in stored for frame in frames], cost_model,
                              _handoff_link(sagellm_cfg, cost_model, handoffs))


def _paired_references(pdir: Path, doc: dict[str, Any], cost_model, sagellm_cfg
                       ) -> list[tuple[int, dict[str, Any]]] | None:
    """(repeat, serving factors of that run's own references) for each counted live run, read
    from the stored reference steps against `cost_model`'s profile; None when a run has none.
    With idle-probe timings stored (`_idle_probe_pricing`), the factors are at the nominal probe
    speed and the entry has the run's `speed_trace`."""
    stored = _stored_references(pdir, doc)
    if stored is None:
        return None
    out = []
    for repeat, frames, handoffs in stored:
        link = _handoff_link(sagellm_cfg, cost_model, handoffs)
        probed = _idle_probe_pricing(pdir / f"live-{repeat}")
        if probed is None:
            factors = _reference_factors(frames, cost_model, link)
            if (pdir / f"live-{repeat}" / IDLE_PROBE_FILE).exists():
                factors["speed_trace"] = None  # the probe ran, but too few timings: priced without it
            out.append((repeat, factors))
        else:
            out.append((repeat, {**_reference_factors(probed[0], cost_model, link), "speed_trace": probed[1]}))
    return out


def _use_reference(cost_model, reference: dict[str, Any]) -> None:
    """Price steps (and the hand-off link) with a serving reference's factors (kinds, and the
    decode row bands it had enough steps of)."""
    keys = ("all", *SERVING_KINDS, *BAND_KEYS)
    cost_model.use_serving_factors({key: f for key, f in reference.items() if key in keys})
    link = reference.get("handoff_link")
    if link:
        cost_model.use_link_serving_factor(link["name"], link["serving_factor"])


def _probe_steps(runner, cost_model) -> list[dict[str, Any]]:
    """Each step of the runner's latest speed probe: its label, measured median and profile time."""
    return [{"label": s.label, "measured_s": s.median_seconds, "profile_s": cost_model.predict(s.batch)}
            for s in runner.last_probe]


def _probe_when_quiet(runner, cost_model, live_cfg, title: str, echo: Callable[[str], None],
                      sleep: Callable[[float], None] = time.sleep,
                      read_cpu: Callable[[], Any] | None = None) -> float:
    """The speed factor of a probe before a live run. With `live.quiet_wait_s`, the probe is
    repeated, 30 s apart, while the hypervisor steals more than `live.max_cpu_steal` of the CPU
    during it, until the wait runs out (then the run goes ahead and its own steal decides whether
    it counts)."""
    from sagellm.backends.cpu_time import CpuTimes, steal_fraction

    read = read_cpu or CpuTimes.read
    deadline = time.monotonic() + live_cfg.quiet_wait_s
    while True:
        cpu = read()
        factor = cost_model.speed_factor(runner.probe())
        steal = steal_fraction(cpu, read())
        if not live_cfg.quiet_wait_s or steal is None or steal <= live_cfg.max_cpu_steal:
            return factor
        left = deadline - time.monotonic()
        if left <= 0:
            echo(f"{title} still {steal:.1%} of the CPU stolen after waiting {live_cfg.quiet_wait_s:.0f} s; "
                 "running anyway")
            return factor
        echo(f"{title} machine noisy: {steal:.1%} of the CPU stolen during the speed probe "
             f"(limit {live_cfg.max_cpu_steal:.0%}), {factor:.2f}x the profile's step times; waiting")
        sleep(min(30.0, left))


def _profiled_cost_model(point: SweepPoint):
    """The point's calibrated profile (a fresh object, free to rescale), or None for a roofline."""
    from simulator.build import build_cost_model, resolve_shape
    from simulator.cost.profiled import ProfiledCostModel

    sim = point.simulation
    shape = resolve_shape(sim.model, sim.sagellm, sim.base_dir)
    model, spec = build_cost_model(sim.hardware, shape, sim.sagellm, sim.base_dir)
    return model if spec is None and isinstance(model, ProfiledCostModel) else None


def _simulate_point(point: SweepPoint, pdir: Path, doc: dict[str, Any], cost_model, echo: Callable[[str], None],
                    progress: bool, verb: str, reference_prediction: str = "pooled") -> None:
    """Simulate the point (with the live side's serving reference or speed factor, if any), then
    compare with its live runs. With `reference_prediction` "paired" and a reference stored for
    every counted live run, the point is simulated once per run with that run's own reference
    (`simulate-<k>/`), and the fidelity table compares the median of those predictions with the
    median of the runs; otherwise once (`simulate/`)."""
    import shutil

    live = [side for side in doc["sides"] if side["side"] == "live"]
    paired = None
    if reference_prediction == "paired" and cost_model is not None and doc.get("serving_reference") and live:
        paired = _paired_references(pdir, doc, cost_model, point.simulation.sagellm)
    for stale in ([pdir / "simulate"] if paired else list(pdir.glob("simulate-*"))):
        shutil.rmtree(stale, ignore_errors=True)  # the other way's predictions, from an earlier (re)simulation
    if paired:
        _simulate_paired(point, pdir, doc, paired, live, echo, verb)
        return
    from simulator.sim import Simulation

    factor, reference = doc.get("speed_factor"), doc.get("serving_reference")
    if cost_model is not None and reference:
        _use_reference(cost_model, reference)
        factor = None
    elif cost_model is not None and factor is not None:
        cost_model.scale(factor)
    result = Simulation(point.simulation, cost_model=cost_model).run(progress=progress)
    if factor is not None:
        result.summary["speed_factor"] = factor
        result.info["speed_factor"] = factor
    if reference:
        result.info["serving_reference"] = reference
    write_side(pdir / "simulate", result.records, result.summary, result.info, result.kv_usage)
    doc["sides"] = [{"side": "simulate", "repeat": -1, "summary": _clean(result.summary)}, *live]
    doc.pop("paired_references", None)
    title = f"[{point.slug}]"
    scaled = "" if factor is None else f", step times x {factor:.2f} for the machine's speed now"
    if reference:
        scaled = f", serving reference {_describe_reference(reference)}"
    echo(format_summary(result.summary, f"{title} {verb} ({result.info['cost_model']}{scaled})"))
    if live:
        table = compare(result.summary, [side["summary"] for side in live])
        _write_fidelity(pdir, doc, table, echo, f"{title} predicted vs measured (median of {len(live)} live runs)")
        _check_steps(pdir, doc, [(side["repeat"], cost_model, None) for side in live], title, echo)


def _simulate_paired(point: SweepPoint, pdir: Path, doc: dict[str, Any], paired: list[tuple[int, dict[str, Any]]],
                     live: list[dict[str, Any]], echo: Callable[[str], None], verb: str) -> None:
    """One simulation per counted live run, priced by that run's own serving reference."""
    from simulator.sim import Simulation

    title = f"[{point.slug}]"
    sims, models = [], []
    for repeat, reference in paired:
        model = _profiled_cost_model(point)  # a fresh model per run: nothing of another run's reference stays
        _use_reference(model, reference)
        speed = _speed_of(reference)
        result = Simulation(point.simulation, cost_model=model, speed=speed).run(progress=False)
        result.info["serving_reference"] = reference
        write_side(pdir / f"simulate-{repeat}", result.records, result.summary, result.info, result.kv_usage)
        sims.append({"side": "simulate", "repeat": repeat, "summary": _clean(result.summary)})
        models.append((repeat, model, speed))
        summary = result.summary
        echo(f"{title} {verb} for live run {repeat} with its reference ({_describe_reference(reference)}): "
             f"TTFT mean {summary['ttft_mean'] * 1e3:.0f} ms, TPOT mean {summary['tpot_mean'] * 1e3:.1f} ms, "
             f"{summary['request_throughput']:.3f} req/s")
    doc["sides"] = [*sims, *live]
    doc["paired_references"] = [{"repeat": repeat, **reference} for repeat, reference in paired]
    table = compare([side["summary"] for side in sims], [side["summary"] for side in live])
    _write_fidelity(pdir, doc, table, echo, f"{title} predicted vs measured (median of {len(sims)} simulations, "
                                            f"each with its live run's reference, vs median of {len(live)} live runs)")
    _check_steps(pdir, doc, models, title, echo)


def _write_fidelity(pdir: Path, doc: dict[str, Any], table: list, echo: Callable[[str], None], title: str) -> None:
    doc["fidelity"] = [_clean(r.to_dict()) for r in table]
    pd.DataFrame([r.to_dict() for r in table]).to_csv(pdir / "fidelity.csv", index=False)
    echo(format_table(table, title))


def _check_steps(pdir: Path, doc: dict[str, Any], models: list[tuple[int, Any, Any]], title: str,
                 echo: Callable[[str], None]) -> None:
    """Price each counted live run's own steps with the cost model that predicted it ((repeat,
    model, speed trace or None): the point's model, or each run's own with paired references),
    summed over the runs: `doc["step_check"]`."""
    from experiments.fidelity import StepCheck, check_steps, format_step_check
    from experiments.results import read_steps

    sums: dict[str, list] = {}
    runs = 0
    for repeat, model, speed in models:
        frame = read_steps(pdir / f"live-{repeat}")
        if model is None or frame.empty:
            continue
        runs += 1
        for c in check_steps(model, frame, speed):
            acc = sums.setdefault(c.kind, [0, 0.0, 0.0])
            acc[0] += c.num_steps
            acc[1] += c.measured_s
            acc[2] += c.predicted_s
    if not runs:
        return
    checks = [StepCheck(kind, n, m, p) for kind, (n, m, p) in sums.items()]
    doc["step_check"] = [_clean(c.to_dict()) for c in checks]
    echo(format_step_check(checks, f"{title} step times on the {runs} live runs' own batches "
                                   "(the cost model as scaled for each run)"))


def _resimulate_point(cfg: ExperimentConfig, point: SweepPoint, pdir: Path, doc: dict[str, Any],
                      echo: Callable[[str], None], progress: bool) -> dict[str, Any]:
    cost_model = _profiled_cost_model(point)
    if cost_model is not None:
        probes = _reprobe(pdir, doc, cost_model)
        if probes:
            doc["speed_factor"], doc["speed_probes"] = statistics.median(probes), probes
        if doc.get("serving_reference"):
            doc["serving_reference"] = (_point_reference(pdir, doc, cost_model, point.simulation.sagellm)
                                        or doc["serving_reference"])
    _simulate_point(point, pdir, doc, cost_model, echo, progress, "simulated again", cfg.live.reference_prediction)
    return doc


def _reprobe(pdir: Path, doc: dict[str, Any], cost_model) -> list[float] | None:
    """The speed factors of the counted live runs' probes (before and after each) read again
    against `cost_model` (the profile as it is now, perhaps refitted or recalibrated since the
    runs): measured / predicted time of each probe's steps, from the timings each run stored. None
    when a run stored no probe steps (runs made before they were stored) or a step is not a shape
    of `PROBE_GRID`: the point then keeps the factor it was run with."""
    from sagellm.engine.calibration import PROBE_GRID, describe
    from sagellm.graph import BatchShape

    shapes = {describe(chunks): BatchShape.from_chunks(list(chunks)) for chunks in PROBE_GRID}
    factors = []
    for side in doc["sides"]:
        if side["side"] != "live":
            continue
        path = pdir / f"live-{side['repeat']}" / "summary.json"
        info = json.loads(path.read_text()).get("info", {}) if path.exists() else {}
        for key in ("speed_probe_before", "speed_probe_after"):
            steps = info.get(key)
            if not steps or any(s["label"] not in shapes for s in steps):
                return None
            factors.append(sum(s["measured_s"] for s in steps)
                           / sum(cost_model.predict(shapes[s["label"]]) for s in steps))
    return factors or None


class _LivePool:
    """One live engine at a time, rebuilt when a point changes the engine's settings."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.key: str | None = None
        self.runner = None

    def get(self, sim_cfg):
        from experiments.live import LiveRunner

        engine_cfg = sim_cfg.sagellm
        if sim_cfg.model is not None:
            engine_cfg = engine_cfg.replace(model={"model_id": str(_model_path(sim_cfg))})
        cluster = sim_cfg.cluster
        key = json.dumps([engine_cfg.to_dict(), cluster.num_replicas, cluster.router, cluster.router_args],
                         sort_keys=True)
        if key != self.key:
            self.close()
            self.runner = LiveRunner(engine_cfg, cluster.num_replicas, cluster.router,
                                     idle_probe=self.cfg.live.idle_speed_probe, router_args=cluster.router_args)
            self.runner.warmup(self.cfg.live.warmup_requests)
            self.key = key
        return self.runner

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
            self.key = None


def _model_path(sim_cfg) -> Path:
    p = Path(sim_cfg.model).expanduser()
    return p if p.is_absolute() or p.exists() else sim_cfg.base_dir / p


def _ensure_profiles(cfg: ExperimentConfig, echo: Callable[[str], None]) -> None:
    """Calibrate this machine for each (model, dtype) that a `local` point needs and lacks."""
    from simulator.build import resolve_shape
    from simulator.commands import calibrate
    from simulator.cost.machine import ProfileFromAnotherMachine, find_local_profile

    seen = set()
    for point in cfg.points:
        sim = point.simulation
        if sim.hardware != "local":
            continue
        shape = resolve_shape(sim.model, sim.sagellm, sim.base_dir)
        key = (shape, sim.sagellm.model.dtype, sim.sagellm.backend.num_threads)
        if key in seen:
            continue
        seen.add(key)
        try:
            find_local_profile(shape, sim.sagellm.model.dtype, threads=sim.sagellm.backend.num_threads)
        except ConfigError as exc:
            if not cfg.calibrate:
                raise
            reason = "from another machine" if isinstance(exc, ProfileFromAnotherMachine) else "none yet"
            echo(f"calibrating this machine for {shape.name or 'the model'} in {sim.sagellm.model.dtype} "
                 f"(a few minutes, once): its profile: {reason}. {exc}")
            engine_cfg = sim.sagellm
            if sim.model is not None:
                engine_cfg = engine_cfg.replace(model={"model_id": str(_model_path(sim))})
            path, _, report, _ = calibrate(engine_cfg)
            echo(f"profile: {path} (held-out median error {report.median_error:.1%})")


def _manifest(cfg: ExperimentConfig) -> dict[str, Any]:
    from simulator.cost.machine import machine_identity

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "name": cfg.name,
        "description": cfg.description,
        "sides": list(cfg.sides),
        "sweep": cfg.sweep,
        "points": [{"index": p.index, "slug": p.slug, "overrides": p.overrides,
                    "seed": p.simulation.workload.seed} for p in cfg.points],
        "config": _jsonable_config(cfg.raw),
        "git_revision": _git_revision(),
        "machine": {**machine_identity(), "python": platform.python_version()},
        "versions": versions,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _git_revision() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _jsonable_config(raw: dict[str, Any]) -> Any:
    return json.loads(json.dumps(raw, default=str))


# Live settings that change how long a measurement may take, or how it is predicted, not what is
# measured: a resumed run may change them (e.g. to wait longer for a quiet machine).
_HOW_TO_MEASURE = ("max_attempts", "quiet_wait_s", "timeout_s", "reference_prediction")


def _what_is_measured(config: dict[str, Any]) -> dict[str, Any]:
    live = {k: v for k, v in (config.get("live") or {}).items() if k not in _HOW_TO_MEASURE}
    return {**config, "live": live}


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return jsonable(d)
