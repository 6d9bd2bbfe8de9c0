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


def cmd_refit(path: Path) -> int:
    """Fit a profile again from its saved samples (for example after the model form changed)."""
    from sagellm.engine.calibration import CalibrationSample
    from sagellm.graph import BatchShape
    from simulator.cost.profiled import ProfiledCostModel, read_profile

    shape, dtype, doc = read_profile(path)
    with open(path.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    fields = ("num_tokens", "num_seqs", "num_decodes", "num_sampled", "attention_pairs", "kv_context_tokens")
    samples = [CalibrationSample(r["label"], BatchShape(*(int(r[k]) for k in fields)), float(r["median_s"]),
                       float(r["min_s"]), float(r["max_s"]), int(r["repeats"])) for r in rows]
    meta = {k: v for k, v in doc.items() if k in ("id", "machine", "torch", "threads", "model_path", "created",
                                                         "repeats", "kv_links")}
    model, report = ProfiledCostModel.fit_with_holdout(shape, dtype, [s.batch for s in samples],
                                                       [s.median_seconds for s in samples], meta=meta,
                                                       in_situ=[s.label == "in situ" for s in samples])
    model.copy_bandwidth = doc.get("copy_bandwidth", model.copy_bandwidth)
    model.copy_latency = doc.get("copy_latency", model.copy_latency)
    model.meta["heldout"] = report.__dict__
    model.save(path, _samples_csv(samples, model))
    print(f"refitted {path.name} on {len(samples)} samples: held-out grid shapes median {report.median_error:.1%}, "
          f"p90 {report.p90_error:.1%}, max {report.max_error:.1%}; in-situ serving steps median "
          f"{report.in_situ_median_error:.1%}; serving factors {_factors(model)}")
    return 0


def cmd_calibrate(args: argparse.Namespace, config) -> int:
    if args.refit:
        return cmd_refit(Path(args.refit))
    if args.kv_links:
        return cmd_kv_links(Path(args.kv_links), config)
    if args.pd_link:
        return cmd_pd_link(Path(args.pd_link), config)
    path, model, report, n = calibrate(config, repeats=args.repeats, quick=args.quick,
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


def calibrate(config, repeats: int = 5, quick: bool = False, output_dir: Path | None = None, progress: bool = True):
    """Time the live engine on the calibration grid, fit, save. Returns (json path, model, report, samples)."""
    import torch
    from tqdm import tqdm

    from sagellm.backends.cpu_time import CpuTimes, steal_fraction
    from sagellm.engine import SageLLMEngine
    from sagellm.engine.calibration import default_grid, measure, measure_in_situ
    from simulator.cost.profiled import PROFILE_DIR, ProfiledCostModel, machine_identity, profile_id

    engine = SageLLMEngine(config).initialize()
    cpu_before = CpuTimes.read()
    try:
        grid = default_grid(engine.kv_manager.capacity_tokens)
        if quick:
            grid = grid[::3]
        with tqdm(total=(repeats + 2) * len(grid), desc="calibrating", unit="step", disable=not progress) as bar:
            samples = measure(engine, grid, repeats=repeats, progress=lambda d, t: bar.update(d - bar.n))
        if not quick:
            samples += measure_in_situ(engine)
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
        model, report = ProfiledCostModel.fit_with_holdout(shape, dtype, [s.batch for s in samples],
                                                           [s.median_seconds for s in samples], meta=meta,
                                                           in_situ=[s.label == "in situ" for s in samples])
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
