"""`sagellm simulate` and `sagellm calibrate`: the command-line side of the simulator."""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

from sagellm.metrics.io import format_summary, write_run


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulator.config import SimulationConfig
    from simulator.sim import Simulation

    config = SimulationConfig.from_yaml(args.config)
    sim = Simulation(config)
    result = sim.run(progress=not args.quiet)
    out_dir = Path(args.output) if args.output else Path("results") / config.name / time.strftime(
        "%Y%m%dT%H%M%SZ", time.gmtime())
    write_run(out_dir, result.records, result.summary, result.kv_usage, result.info)
    info = result.info
    sched = config.sagellm.scheduler
    workers = (f"{sched.prefill_workers} prefill + {sched.decode_workers} decode workers (strict)"
               if sim.strict is not None else f"{config.cluster.num_replicas} replica(s) ({sched.schedule_mode.value})")
    print(format_summary(result.summary, f"{config.name}: {info['cost_model']}, {workers}, "
                                         f"{info['num_kv_blocks_per_replica']} KV blocks each"))
    wall = result.wall_seconds
    print(f"  simulated {info['simulated_seconds']:.1f} s in {wall:.2f} s wall "
          f"({len(result.records) / max(wall, 1e-9):.0f} req/s, {info['num_steps']} steps)")
    if "handoff" in info:
        h = info["handoff"]
        print(f"  KV hand-offs {h['count']}: mean {h['mean_s'] * 1e3:.2f} ms, p90 {h['p90_s'] * 1e3:.2f} ms")
    if result.summary.get("num_rejected"):
        print(f"  rejected {result.summary['num_rejected']:.0f} request(s) (longer than the context window); "
              "first: " + info["rejected"][0][1])
    print(f"per-request results: {out_dir / 'requests.csv'}")
    return 0


def _factors(model) -> str:
    kinds = ", ".join(f"{kind} {f:.3f}" for kind, f in model.serving_factors.items())
    return f"{kinds} (all steps {model.serving_factor:.3f})"


def _read_samples(path: Path) -> list:
    """The calibration samples saved beside a profile (`<profile>.csv`)."""
    from sagellm.engine.calibration import CalibrationSample
    from sagellm.graph import BatchShape

    with open(path.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    fields = ("num_tokens", "num_seqs", "num_decodes", "num_sampled", "attention_pairs", "kv_context_tokens")
    return [CalibrationSample(r["label"], BatchShape(*(int(r[k]) for k in fields)), float(r["median_s"]),
                              float(r["min_s"]), float(r["max_s"]), int(r["repeats"])) for r in rows]


def _refit(path: Path, samples: list, extra_meta: dict | None = None):
    """Fit the profile at `path` again on `samples` (keeping its identity, links, copy costs and
    knots: its grid may not time the row counts of newer knots) and save it with them. Samples of a
    mode's in-situ run (`mode_of_label`) are not fitted: they give that mode's serving factors,
    relative to the model fitted on the rest. Returns (model, report)."""
    from sagellm.config import ConfigError
    from simulator.cost.profiled import FEATURES, ProfiledCostModel, knots_of, read_profile

    shape, dtype, doc = read_profile(path)
    try:
        knots = knots_of(doc.get("features", FEATURES))
    except ValueError as exc:
        raise ConfigError(f"calibrated profile {str(path)!r}: {exc}") from exc
    meta = {k: v for k, v in doc.items() if k in ("id", "machine", "torch", "threads", "model_path", "created",
                                                  "repeats", "cpu_steal", "in_situ", "in_situ_by_mode", "kv_links")}
    meta.update(extra_meta or {})
    base = [s for s in samples if mode_of_label(s.label) is None]
    model, report = ProfiledCostModel.fit_with_holdout(shape, dtype, [s.batch for s in base],
                                                       [s.median_seconds for s in base], meta=meta,
                                                       in_situ=[s.label == IN_SITU_LABEL for s in base],
                                                       probe=[s.label.startswith(PROBE_LABEL) for s in base],
                                                       knots=knots)
    model.copy_bandwidth = doc.get("copy_bandwidth", model.copy_bandwidth)
    model.copy_latency = doc.get("copy_latency", model.copy_latency)
    model.meta["heldout"] = report.__dict__
    for mode in sorted({mode_of_label(s.label) for s in samples} - {None}):
        step_label, probe_label = in_situ_labels(mode)
        steps = [s for s in samples if s.label == step_label]
        probe = [s for s in samples if s.label.startswith(probe_label)]
        if steps:
            factors, speed = model.serving_factors_of([s.batch for s in steps], [s.median_seconds for s in steps],
                                                      [s.batch for s in probe], [s.median_seconds for s in probe])
            model.mode_serving_factors[mode] = factors
            model.meta.setdefault("in_situ_by_mode", {}).setdefault(mode, {})["probe_speed"] = speed
    model.save(path, _samples_csv(samples, model))
    return model, report


def cmd_refit(path: Path) -> int:
    """Fit a profile again from its saved samples (for example after the model form changed)."""
    samples = _read_samples(path)
    model, report = _refit(path, samples)
    print(f"refitted {path.name} on {len(samples)} samples: held-out grid shapes median {report.median_error:.1%}, "
          f"p90 {report.p90_error:.1%}, max {report.max_error:.1%}; in-situ serving steps median "
          f"{report.in_situ_median_error:.1%}; serving factors {_factors(model)}")
    return 0


PROBE_LABEL = "probe: "  # a speed-probe shape timed around the in-situ steps (never fitted)
IN_SITU_LABEL = "in situ"
IN_SITU_MODES = ("hybrid", "time_share", "strict")


def in_situ_labels(mode: str | None) -> tuple[str, str]:
    """(label of a serving step, label prefix of a speed-probe sample) of an in-situ run: the
    default run's for None or "hybrid", else "in situ@<mode>" and "probe@<mode>: "."""
    if mode in (None, "hybrid"):
        return IN_SITU_LABEL, PROBE_LABEL
    return f"{IN_SITU_LABEL}@{mode}", f"probe@{mode}: "


def mode_of_label(label: str) -> str | None:
    """The schedule mode of a sample of a mode's own in-situ run ("in situ@strict",
    "probe@strict: <shape>"), else None (grid samples, and the default in-situ run's)."""
    head = label.split(":", 1)[0]
    if "@" in head and head.split("@", 1)[0] in (IN_SITU_LABEL, "probe"):
        return head.split("@", 1)[1]
    return None


def in_situ_samples(engine_config, replicas: int = 1, engine=None, num_requests: int = 48,
                    runs: int = 1, mode: str | None = None, rate: float = 1.2) -> tuple[list, dict]:
    """Steps of live serving for the serving factors (`measure_in_situ`, `num_requests` requests
    at `rate` req/s, `runs` times with different seeds), each run with the speed probe timed before and after it
    (labelled `PROBE_LABEL` + shape). They run on
    `engine` when given (one in-process engine), else on `replicas` engines built from
    `engine_config` (a `ClusterEngine` when more than one, so that they compete for the cores as a
    cluster's workers do). With `mode` ("time_share", "strict") the engines run that schedule mode
    (strict: the config's prefill and decode workers, `replicas` unused) and the samples are
    labelled "in situ@<mode>" and "probe@<mode>: <shape>". Returns (samples, meta: replicas,
    CPU stolen by other VMs, time)."""
    from dataclasses import replace

    from sagellm.backends.cpu_time import CpuTimes, steal_fraction
    from sagellm.engine import ClusterEngine, SageLLMEngine
    from sagellm.engine.calibration import measure_in_situ

    if replicas <= 0:
        raise ValueError(f"in-situ replicas: must be >= 1, got {replicas}")
    if runs <= 0:
        raise ValueError(f"in-situ runs: must be >= 1, got {runs}")
    if not rate > 0:
        raise ValueError(f"in-situ rate: must be > 0 req/s, got {rate}")
    if mode is not None and mode not in IN_SITU_MODES:
        raise ValueError(f"in-situ mode: must be one of {IN_SITU_MODES}, got {mode!r}")
    own_mode = mode not in (None, "hybrid")
    step_label, probe_label = in_situ_labels(mode)
    own = engine is None
    if own:
        if own_mode:
            engine_config = engine_config.replace(scheduler={"mode": mode})
        strict = mode == "strict"
        engine = (SageLLMEngine(engine_config) if replicas == 1 and not strict
                  else ClusterEngine(engine_config, num_replicas=replicas)).initialize()

    def probe() -> list:
        return [replace(s, label=probe_label + s.label) for s in engine.probe()]

    try:
        cpu_before = CpuTimes.read()
        samples = []
        for run in range(runs):
            samples += probe()
            samples += [replace(s, label=step_label)
                        for s in measure_in_situ(engine, num_requests=num_requests, rate=rate, seed=run)]
            samples += probe()
        meta = {"replicas": len(engine.workers) if isinstance(engine, ClusterEngine) else 1,
                "requests": num_requests, "rate": rate, "runs": runs, "mode": mode or "hybrid",
                "cpu_steal": steal_fraction(cpu_before, CpuTimes.read()),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    finally:
        if own:
            engine.shutdown()
    return samples, meta


def cmd_in_situ(path: Path, config, replicas: int, num_requests: int = 48, runs: int = 1,
                mode: str | None = None, rate: float = 1.2) -> int:
    """Time the serving steps again and refit the serving factors; the grid samples stay. Without
    `mode` (or "hybrid") this replaces the profile's in-situ samples and default serving factors;
    with "time_share" or "strict" it replaces that mode's own samples and factors only."""
    from simulator.cost.profiled import ProfiledCostModel

    old = ProfiledCostModel.load(path)
    own_mode = mode not in (None, "hybrid")
    engine_config = config.replace(model={"dtype": old.dtype}, backend={"num_threads": old.meta.get("threads")})
    fresh, meta = in_situ_samples(engine_config, replicas, num_requests=num_requests, runs=runs, mode=mode,
                                  rate=rate)
    step_label, probe_label = in_situ_labels(mode)
    samples = [s for s in _read_samples(path)
               if s.label != step_label and not s.label.startswith(probe_label)] + fresh
    if own_mode:
        by_mode = dict(old.meta.get("in_situ_by_mode") or {})
        by_mode[mode] = meta
        model, report = _refit(path, samples, {"in_situ_by_mode": by_mode})
        speed = model.meta["in_situ_by_mode"][mode]["probe_speed"]
        before = _mode_factors(old.mode_serving_factors.get(mode))
        after = _mode_factors(model.mode_serving_factors[mode])
    else:
        model, report = _refit(path, samples, {"in_situ": meta})
        speed, before, after = model.meta["in_situ_probe_speed"], _factors(old), _factors(model)
    steal = "" if meta["cpu_steal"] is None else f", {meta['cpu_steal']:.1%} of the CPU stolen by other VMs"
    steps = sum(s.label == step_label for s in fresh)
    print(f"{steps} in-situ steps in {runs} run(s) on {meta['replicas']} {meta['mode']} worker(s) of "
          f"{old.meta.get('threads')} thread(s){steal}; the machine ran at {speed:.3f}x the profile's time on "
          f"the speed probe around them")
    print(f"{meta['mode']} serving factors {before} -> {after}")
    print(f"profile: {path}")
    return 0


def _mode_factors(factors: dict[str, float] | None) -> str:
    if factors is None:
        return "(none)"
    kinds = ", ".join(f"{kind} {f:.3f}" for kind, f in factors.items() if kind != "all")
    return f"{kinds} (all steps {factors['all']:.3f})"


def cmd_calibrate(args: argparse.Namespace, config) -> int:
    if args.refit:
        return cmd_refit(Path(args.refit))
    if args.kv_links:
        return cmd_kv_links(Path(args.kv_links), config)
    if args.pd_link:
        return cmd_pd_link(Path(args.pd_link), config)
    if args.in_situ:
        return cmd_in_situ(Path(args.in_situ), config, args.in_situ_replicas, args.in_situ_requests,
                           args.in_situ_runs, args.in_situ_mode, args.in_situ_rate)
    path, model, report, n = calibrate(config, repeats=args.repeats, quick=args.quick,
                                       in_situ_replicas=args.in_situ_replicas,
                                       in_situ_requests=args.in_situ_requests, in_situ_runs=args.in_situ_runs,
                                       output_dir=Path(args.output_dir) if args.output_dir else None,
                                       progress=not args.quiet)
    meta = model.meta
    print(f"calibrated on {n} samples (grid shapes x {args.repeats} repeats, and steps of a short live run) "
          f"on {meta['machine']['cpu']} "
          f"({meta['threads']} threads), {model.shape.name}, {model.dtype}")
    print(f"held-out error on {report.num_heldout} grid shapes: median {report.median_error:.1%}, "
          f"p90 {report.p90_error:.1%}, max {report.max_error:.1%}; on {report.in_situ_heldout} in-situ steps: "
          f"median {report.in_situ_median_error:.1%} (validation only)")
    print(f"serving factors {_factors(model)} (live serving steps vs the same steps alone)")
    print(f"profile: {path} (+ .csv samples)")
    return 0


def cmd_kv_links(path: Path, config) -> int:
    """Time the engine's KV copies between tiers and store them in an existing profile."""
    from sagellm.engine import SageLLMEngine
    from sagellm.engine.kv_calibration import measure_kv_links
    from simulator.cost.profiled import ProfiledCostModel

    model = ProfiledCostModel.load(path)
    engine = SageLLMEngine(config.replace(model={"dtype": model.dtype})).initialize()
    try:
        model.kv_links = measure_kv_links(engine.kv_cache)
    finally:
        engine.shutdown()
    with path.with_suffix(".csv").open(newline="") as f:
        samples_csv = f.read()
    model.save(path, samples_csv)
    for name, link in model.kv_links.items():
        print(f"{name:10s} {link['bandwidth'] / 1e9:7.2f} GB/s  latency {link['latency'] * 1e6:8.1f} us")
    print(f"profile: {path}")
    return 0


def cmd_pd_link(path: Path, config) -> int:
    """Time the live prefill-to-decode hand-off, block-wise and layer-wise, and store them as the
    profile's "hbm->peer" and "hbm->peer_layer" links."""
    from sagellm.engine.kv_calibration import link_time
    from sagellm.engine.pd_calibration import measure_handoff_link
    from simulator.cost.profiled import ProfiledCostModel

    model = ProfiledCostModel.load(path)
    threads = model.meta.get("threads")
    links = measure_handoff_link(config.replace(model={"dtype": model.dtype}, backend={"num_threads": threads}))
    for name, link in links.items():
        model.kv_links[name] = {k: link[k] for k in ("bandwidth", "latency", "serving_factor", "cpu_steal")}
        steal = "" if link["cpu_steal"] is None else f"; {link['cpu_steal']:.1%} of the CPU stolen by other VMs"
        print(f"{name:16s} {link['bandwidth'] / 1e9:7.2f} GB/s  latency {link['latency'] * 1e6:8.1f} us "
              f"({link['samples']} hand-offs alone, {threads} thread(s) per worker), x {link['serving_factor']:.3f} "
              f"while serving ({link['serving_samples']} hand-offs){steal}")
        for size, seconds in link["points"]:
            print(f"    {size / 1e6:8.3f} MB after the step: {seconds * 1e3:7.2f} ms measured (median), "
                  f"{link_time(link, size) * 1e3:7.2f} ms fitted")
    with path.with_suffix(".csv").open(newline="") as f:
        samples_csv = f.read()
    model.save(path, samples_csv)
    print(f"profile: {path}")
    return 0


def calibrate(config, repeats: int = 5, quick: bool = False, output_dir: Path | None = None, progress: bool = True,
              in_situ_replicas: int = 1, in_situ_requests: int = 48, in_situ_runs: int = 1):
    """Time the live engine on the calibration grid and serving steps (on `in_situ_replicas`
    engines at once), fit, save. Returns (json path, model, report, number of samples)."""
    import torch
    from tqdm import tqdm

    from sagellm.backends.cpu_time import CpuTimes, steal_fraction
    from sagellm.engine import SageLLMEngine
    from sagellm.engine.calibration import default_grid, measure
    from simulator.cost.machine import PROFILE_DIR, machine_identity, profile_id
    from simulator.cost.profiled import ProfiledCostModel

    engine = SageLLMEngine(config).initialize()
    cpu_before = CpuTimes.read()
    try:
        grid = default_grid(engine.kv_manager.capacity_tokens)
        if quick:
            grid = grid[::3]
        with tqdm(total=(repeats + 2) * len(grid), desc="calibrating", unit="step", disable=not progress) as bar:
            samples = measure(engine, grid, repeats=repeats, progress=lambda d, t: bar.update(d - bar.n))
        in_situ = None
        if not quick:
            fresh, in_situ = in_situ_samples(config, in_situ_replicas, engine if in_situ_replicas == 1 else None,
                                             in_situ_requests, in_situ_runs)
            samples += fresh
        shape, dtype = engine.shape, config.model.dtype
        meta = {
            "id": profile_id(shape, dtype, threads=torch.get_num_threads()),
            "machine": machine_identity(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "model_path": str(engine.model_path),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "repeats": repeats,
            # the share of the CPU other VMs took while the grid and in-situ steps were timed
            "cpu_steal": steal_fraction(cpu_before, CpuTimes.read()),
        }
        if in_situ is not None:
            meta["in_situ"] = in_situ
        model, report = ProfiledCostModel.fit_with_holdout(shape, dtype, [s.batch for s in samples],
                                                           [s.median_seconds for s in samples], meta=meta,
                                                           in_situ=[s.label == "in situ" for s in samples],
                                                           probe=[s.label.startswith(PROBE_LABEL) for s in samples])
        model.meta["heldout"] = report.__dict__
        from sagellm.engine.kv_calibration import measure_kv_links

        model.kv_links = measure_kv_links(engine.kv_cache)
        path = Path(output_dir or PROFILE_DIR) / f"{meta['id']}.json"
        model.save(path, _samples_csv(samples, model))
    finally:
        engine.shutdown()
    return path, model, report, len(samples)


def _samples_csv(samples, model) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["label", "num_tokens", "num_seqs", "num_decodes", "num_sampled", "attention_pairs",
                "kv_context_tokens", "median_s", "min_s", "max_s", "repeats", "predicted_s"])
    for s in samples:
        b = s.batch
        w.writerow([s.label, *b.as_vector(), f"{s.median_seconds:.6f}", f"{s.min_seconds:.6f}", f"{s.max_seconds:.6f}",
                    s.repeats, f"{model.predict(b):.6f}"])
    return buf.getvalue()
