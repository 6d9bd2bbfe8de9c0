"""Experiment files, sweeps, resume, and one small run on both sides."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

from experiments.config import ExperimentConfig
from experiments.runner import run_experiment
from sagellm.config import ConfigError

PROFILES = Path(__file__).resolve().parent.parent / "simulator" / "hardware" / "profiles"
WORKLOAD = {"num_requests": 12, "seed": 2, "arrival": {"kind": "poisson", "rate": 2.0},
            "prompt_len": {"kind": "uniform", "low": 16, "high": 64},
            "output_len": {"kind": "uniform", "low": 4, "high": 12}}


def _sim_only(**extra) -> dict:
    d = {"name": "t", "model": "llama-2-7b", "hardware": "h100-sxm", "sides": ["simulate"],
         "sagellm": {"model": {"dtype": "bfloat16"}}, "workload": WORKLOAD}
    d.update(extra)
    return d


@pytest.mark.parametrize(
    "change, field",
    [
        ({"sides": ["simulate", "replay"]}, "sides"),
        ({"colour": "red"}, "colour"),
        ({"sides": ["live"]}, "hardware"),  # a roofline device cannot run live here
        ({"sweep": {"workload.arrival.rat": [1.0]}}, "workload.arrival.rat"),
        ({"sweep": {"sides": [["live"]]}}, "sweep.sides"),
        ({"sweep": {"workload.arrival.rate": []}}, "sweep.workload.arrival.rate"),
        ({"live": {"repeats": 0}}, "live.repeats"),
        ({"name": ""}, "name"),
        ({"sagellm": {"scheduler": {"max_num_seq": 4}}}, "sagellm.scheduler.max_num_seq"),
        ({"sweep": {"variants": [{"label": "x", "sides": ["live"]}]}}, "sweep.variants"),
        ({"sweep": {"variants": [{"label": "only-a-label"}]}}, "sweep.variants"),
        ({"sweep": {"variants": [{"sagellm.scheduler.mode": "both"}]}}, "sagellm.scheduler.mode"),
        ({"live": {"quiet_wait_s": -1.0}}, "live.quiet_wait_s"),
        ({"live": {"quiet_wait_s": 60.0}}, "live.quiet_wait_s"),  # without max_cpu_steal
        ({"live": {"serving_reference_s": -5}}, "live.serving_reference_s"),
        ({"live": {"serving_reference_requests": 2.5}}, "live.serving_reference_requests"),
        ({"live": {"serving_reference_requests": 10, "serving_reference_s": 5}}, "live.serving_reference_requests"),
        ({"live": {"reference_prediction": "mean"}}, "live.reference_prediction"),
        ({"live": {"serving_reference_after": True}}, "live.serving_reference_after"),  # no reference to repeat
        ({"live": {"serving_reference_requests": 5, "serving_reference_after": "yes"}}, "live.serving_reference_after"),
        ({"live": {"idle_speed_probe": "yes"}}, "live.idle_speed_probe"),
    ],
)
def test_bad_experiment_files_name_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(_sim_only(**change))
    assert field in str(err.value)


def test_live_side_without_a_profile_and_without_calibration_names_the_hardware(tmp_path):
    cfg = ExperimentConfig.from_dict({
        "name": "t", "hardware": "local", "sides": ["simulate", "live"], "calibrate": False,
        "sagellm": {"model": {"dtype": "float16"}}, "workload": WORKLOAD,  # no float16 profile is shipped
    })
    with pytest.raises(ConfigError) as err:
        run_experiment(cfg, tmp_path, echo=lambda s: None, progress=False)
    assert "hardware" in str(err.value) and "calibrate" in str(err.value)


def test_sweep_is_a_grid_of_overrides():
    cfg = ExperimentConfig.from_dict(_sim_only(sweep={"workload.arrival.rate": [1.0, 4.0],
                                                      "sagellm.scheduler.max_num_seqs": [2, 8]}))
    assert len(cfg.points) == 4
    p = cfg.points[3]
    assert p.overrides == {"workload.arrival.rate": 4.0, "sagellm.scheduler.max_num_seqs": 8}
    assert p.simulation.workload.arrival.rate == 4.0 and p.simulation.sagellm.scheduler.max_num_seqs == 8
    assert len({q.slug for q in cfg.points}) == 4


def test_variants_set_several_fields_per_point_and_are_named_by_their_label():
    cfg = ExperimentConfig.from_dict(_sim_only(sweep={
        "variants": [{"label": "hybrid-x2", "sagellm.scheduler.mode": "hybrid", "cluster.num_replicas": 2},
                     {"label": "strict", "sagellm.scheduler.mode": "strict", "sagellm.scheduler.decode_workers": 3}],
        "workload.arrival.rate": [1.0, 2.0]}))
    assert [p.slug for p in cfg.points] == ["000_hybrid-x2_rate=1.0", "001_hybrid-x2_rate=2.0",
                                           "002_strict_rate=1.0", "003_strict_rate=2.0"]
    hybrid, strict = cfg.points[0].simulation, cfg.points[3].simulation
    assert hybrid.cluster.num_replicas == 2 and hybrid.sagellm.scheduler.mode == "hybrid"
    assert strict.sagellm.scheduler.decode_workers == 3 and strict.workload.arrival.rate == 2.0
    assert cfg.points[2].labels == {"variants": "strict", "workload.arrival.rate": 1.0}


def test_an_interrupted_sweep_resumes_without_redoing_finished_points(tmp_path, monkeypatch):
    import simulator.sim as sim_module

    cfg = ExperimentConfig.from_dict(_sim_only(sweep={"workload.arrival.rate": [1.0, 2.0, 4.0]}))
    calls = []
    interrupt = {"armed": True}
    real_run = sim_module.Simulation.run

    def failing_run(self, progress=False):
        calls.append(self.config.workload.arrival.rate)
        if len(calls) == 2 and interrupt["armed"]:
            interrupt["armed"] = False
            raise RuntimeError("interrupted half-way")
        return real_run(self, progress)

    monkeypatch.setattr(sim_module.Simulation, "run", failing_run)
    with pytest.raises(RuntimeError, match="interrupted half-way"):
        run_experiment(cfg, tmp_path, echo=lambda s: None, progress=False)
    (run_dir,) = (tmp_path / "t").iterdir()
    assert [p.name for p in sorted((run_dir / "points").iterdir()) if (p / "done.json").exists()] == ["000_rate=1.0"]
    calls.clear()
    run_experiment(cfg, tmp_path, resume=run_dir, echo=lambda s: None, progress=False)
    assert calls == [2.0, 4.0]
    summary = pd.read_csv(run_dir / "summary.csv")
    assert sorted(summary["workload.arrival.rate"]) == [1.0, 2.0, 4.0]
    changed = ExperimentConfig.from_dict(_sim_only(sweep={"workload.arrival.rate": [1.0, 3.0]}))
    with pytest.raises(ConfigError, match="resume"):
        run_experiment(changed, tmp_path, resume=run_dir, echo=lambda s: None, progress=False)
    # How long to keep trying is not what is measured: a resume may change it.
    patient = ExperimentConfig.from_dict(_sim_only(sweep={"workload.arrival.rate": [1.0, 2.0, 4.0]},
                                                   live={"max_attempts": 20, "timeout_s": 60.0}))
    calls.clear()
    run_experiment(patient, tmp_path, resume=run_dir, echo=lambda s: None, progress=False)
    assert calls == []


@pytest.mark.slow
def test_small_experiment_on_both_sides_writes_the_fidelity_report(tmp_path):
    cfg = ExperimentConfig.from_dict({
        "name": "both", "hardware": "local", "sides": ["simulate", "live"],
        "sagellm": {"scheduler": {"max_num_seqs": 8}},
        "workload": {**WORKLOAD, "num_requests": 6, "arrival": {"kind": "poisson", "rate": 4.0}},
        "live": {"repeats": 1, "warmup_requests": 1, "serving_reference_s": 1.0},
    })
    lines: list[str] = []
    run_dir = run_experiment(cfg, tmp_path, echo=lines.append, progress=False)
    text = "\n".join(lines)
    assert "predicted vs measured" in text and "ttft_mean" in text
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["git_revision"] and manifest["versions"]["torch"] and manifest["points"][0]["seed"] == 2
    fidelity = pd.read_csv(run_dir / "fidelity.csv")
    assert {"request_throughput", "ttft_mean", "tpot_mean", "e2e_latency_p99"} <= set(fidelity["metric"])
    live = pd.read_parquet(run_dir / "points" / "000" / "live-0" / "requests.parquet")
    # Paired references (the default): one simulation per live run, priced by that run's reference.
    sim = pd.read_parquet(run_dir / "points" / "000" / "simulate-0" / "requests.parquet")
    assert not (run_dir / "points" / "000" / "simulate").exists()
    assert list(live.columns) == list(sim.columns)
    assert sorted(live["num_output_tokens"]) == sorted(sim["num_output_tokens"])  # identical work on both sides
    assert (run_dir / "plots" / "cdf_000.png").stat().st_size > 0
    # Every engine step of the live run is logged, and the cost model is checked against them.
    steps = pd.read_parquet(run_dir / "points" / "000" / "live-0" / "steps.parquet")
    info = json.loads((run_dir / "points" / "000" / "live-0" / "summary.json").read_text())["info"]
    assert steps["seconds"].sum() == pytest.approx(info["worker_busy_seconds"][0], rel=1e-9)
    # each request computes its prompt and all but its last output token (no preemption here)
    assert live["num_preemptions"].sum() == 0
    assert steps["num_tokens"].sum() == (live["num_prompt_tokens"] + live["num_output_tokens"] - 1).sum()
    assert steps["end_time"].is_monotonic_increasing and steps["end_time"].iloc[0] > 0
    done = json.loads((run_dir / "points" / "000" / "done.json").read_text())
    (overall,) = [c for c in done["step_check"] if c["kind"] == "all"]
    assert overall["num_steps"] == len(steps) and overall["measured_s"] == pytest.approx(steps["seconds"].sum())
    assert "own batches" in text
    # the speed probes around the run are kept step by step
    for key in ("speed_probe_before", "speed_probe_after"):
        assert len(info[key]) == 4 and all(p["measured_s"] > 0 and p["profile_s"] > 0 for p in info[key])
    # ... and read again against the same profile they give the factors the run used
    from experiments.runner import _profiled_cost_model, _reprobe

    probes = _reprobe(run_dir / "points" / "000", done, _profiled_cost_model(cfg.points[0]))
    assert probes == pytest.approx(done["speed_probes"], rel=1e-9) and len(probes) == 2
    # The serving reference ran before the run, on its own requests; its steps set the simulator's
    # serving factors (read back from disk, they give the same ones) in place of the probe's.
    ref = pd.read_parquet(run_dir / "points" / "000" / "live-0" / "reference" / "requests.parquet")
    assert len(ref) >= 1 and all(rid.startswith("ref-") for rid in ref["request_id"])
    assert set(ref["request_id"]).isdisjoint(live["request_id"])
    from experiments.runner import _point_reference

    reference = done["serving_reference"]
    assert reference["steps"] > 0 and reference["decode"] > 0 and reference["prefill"] > 0
    assert _point_reference(run_dir / "points" / "000", done, _profiled_cost_model(cfg.points[0]),
                            cfg.points[0].simulation.sagellm) == pytest.approx(reference, rel=1e-9)
    sim_info = json.loads((run_dir / "points" / "000" / "simulate-0" / "summary.json").read_text())["info"]
    assert sim_info["serving_reference"] == pytest.approx(reference, rel=1e-9) and "speed_factor" not in sim_info
    assert "serving factors measured now" in sim_info["cost_model"]
    assert [(s["side"], s["repeat"]) for s in done["sides"]] == [("simulate", 0), ("live", 0)]
    # The same run resimulated pooled: one simulation in simulate/, the paired one removed. With one
    # run the pooled reference is that run's, so the predictions are identical.
    pooled = ExperimentConfig.from_dict({**cfg.raw, "live": {**cfg.raw["live"], "reference_prediction": "pooled"}})
    run_experiment(pooled, tmp_path, resume=run_dir, resimulate=True, echo=lambda s: None, progress=False)
    assert not (run_dir / "points" / "000" / "simulate-0").exists()
    again = pd.read_parquet(run_dir / "points" / "000" / "simulate" / "requests.parquet")
    pd.testing.assert_frame_equal(again, sim)
    assert json.loads((run_dir / "points" / "000" / "done.json").read_text())["sides"][0]["repeat"] == -1


@pytest.mark.slow
def test_a_reference_after_each_run_is_the_next_runs_reference_before_it(tmp_path):
    cfg = ExperimentConfig.from_dict({
        "name": "bracketed", "hardware": "local", "sides": ["simulate", "live"],
        "sagellm": {"scheduler": {"max_num_seqs": 8}},
        "workload": {**WORKLOAD, "num_requests": 4, "arrival": {"kind": "poisson", "rate": 8.0}},
        "live": {"repeats": 2, "warmup_requests": 1, "speed_probe": False, "serving_reference_requests": 2,
                 "serving_reference_after": True, "idle_speed_probe": True},
    })
    run_dir = run_experiment(cfg, tmp_path, echo=lambda s: None, progress=False)
    pdir = run_dir / "points" / "000"
    before = [pd.read_parquet(pdir / f"live-{r}" / "reference" / "requests.parquet") for r in (0, 1)]
    after = [pd.read_parquet(pdir / f"live-{r}" / "reference-after" / "requests.parquet") for r in (0, 1)]
    # Served between the two runs once: run 0's reference after it is run 1's reference before it.
    pd.testing.assert_frame_equal(after[0], before[1])
    assert not before[0].equals(before[1]) and not after[0].equals(after[1])  # three references in all
    assert all(len(f) == 2 and f["request_id"].str.startswith("ref-").all() for f in before + after)
    done = json.loads((pdir / "done.json").read_text())
    steps = [len(pd.read_parquet(pdir / f"live-{r}" / sub / "steps.parquet"))
             for r in (0, 1) for sub in ("reference", "reference-after")]
    assert [p["steps"] for p in done["paired_references"]] == [steps[0] + steps[1], steps[2] + steps[3]]
    assert done["serving_reference"]["steps"] == sum(steps)
    # The idle speed probe ran beside every reference and run (how many timings it got depends on idle cores).
    for r in (0, 1):
        for sub in ("", "reference", "reference-after"):
            info = json.loads((pdir / f"live-{r}" / sub / "summary.json").read_text())["info"]
            assert "samples" in info["idle_probe"] and "median_s" in info["idle_probe"]


def test_a_live_run_waits_for_a_quiet_machine_then_gives_up_waiting():
    from experiments.config import LiveConfig
    from experiments.runner import _probe_when_quiet
    from sagellm.backends.cpu_time import CpuTimes

    class Probed:
        calls = 0

        def probe(self):
            self.calls += 1
            return []

    class Model:
        def speed_factor(self, samples):
            return 1.5

    def reader(steals):
        """CPU counters whose steal share over each probe is the next of `steals`."""
        ticks = iter([tick for s in steals for tick in (CpuTimes(0, 0, 0), CpuTimes(round(100 * (1 - s)), 0,
                                                                                   round(100 * s)))])
        return lambda: next(ticks)

    live = LiveConfig(repeats=1, max_cpu_steal=0.02, quiet_wait_s=3600.0)
    waits, lines, runner = [], [], Probed()
    factor = _probe_when_quiet(runner, Model(), live, "[p]", lines.append, waits.append, reader([0.2, 0.05, 0.01]))
    assert factor == 1.5 and runner.calls == 3 and waits == [30.0, 30.0]
    assert "20.0% of the CPU stolen" in lines[0] and "waiting" in lines[0]

    # Without a wait budget the first probe is used, however noisy.
    runner = Probed()
    no_wait = LiveConfig(repeats=1, max_cpu_steal=0.02)
    _probe_when_quiet(runner, Model(), no_wait, "[p]", lines.append, waits.append, reader([0.5]))
    assert runner.calls == 1

    # A budget that has run out: one probe, a note, and the run goes ahead.
    runner, lines = Probed(), []
    spent = LiveConfig(repeats=1, max_cpu_steal=0.02, quiet_wait_s=1e-9)
    _probe_when_quiet(runner, Model(), spent, "[p]", lines.append, waits.append, reader([0.5]))
    assert runner.calls == 1 and "running anyway" in lines[0]


def test_the_step_check_prices_live_steps_by_kind():
    from experiments.fidelity import check_steps
    from sagellm.graph.batch import BatchShape
    from simulator.cost.profiled import ProfiledCostModel

    paths = [p for p in PROFILES.glob("*.json") if "-1t__" not in p.name]  # shipped profiles, any knots
    assert paths
    for path in paths:
        model = ProfiledCostModel.load(path)
        decode = BatchShape.from_chunks([(100, 1)] * 8)
        mixed = BatchShape.from_chunks([(100, 1)] * 4 + [(0, 200)])
        rows = [{**asdict(decode), "seconds": 2 * model.batch_time(decode)},  # the machine ran twice as slow
                {**asdict(mixed), "seconds": model.batch_time(mixed)},
                {**asdict(BatchShape()), "seconds": 0.0}]  # an empty step is not priced
        checks = {c.kind: c for c in check_steps(model, pd.DataFrame(rows))}
        assert checks["decode"].num_steps == 1 and checks["decode"].relative_error == pytest.approx(-0.5)
        assert checks["prefill"].relative_error == pytest.approx(0.0, abs=1e-12)
        assert checks["all"].num_steps == 2
        assert model.batch_time(mixed) == pytest.approx(model.predict(mixed) * model.serving_factors["prefill"])


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "experiments").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_experiment_file_loads(path):
    cfg = ExperimentConfig.from_yaml(path)
    assert cfg.points and cfg.sides


def test_resimulating_reads_the_stored_speed_probes_again_against_the_profile_as_it_is_now(tmp_path):
    """After a recalibration, a point's speed factor comes from its live runs' stored probe timings
    priced by the new profile, not the factor the old profile gave."""
    from experiments.runner import _reprobe
    from sagellm.engine.calibration import PROBE_GRID, describe
    from sagellm.graph import BatchShape
    from sagellm.models.presets import model_shape
    from simulator.cost.profiled import KNOTS, ProfiledCostModel

    shape = model_shape("smollm2-135m")
    model = ProfiledCostModel(shape, "float32", [0.02 + 0.001 * k for k in KNOTS] + [2e-11, 3e-12, 4e-10, 3e-3, 2e-4])
    steps = [(describe(chunks), model.predict(BatchShape.from_chunks(list(chunks)))) for chunks in PROBE_GRID]
    doc = {"sides": [{"side": "simulate", "repeat": -1}]}
    for r, (before, after) in enumerate(((1.1, 1.3), (0.9, 1.2))):
        info = {key: [{"label": label, "measured_s": t * f, "profile_s": 123.0} for label, t in steps]
                for key, f in (("speed_probe_before", before), ("speed_probe_after", after))}
        (tmp_path / f"live-{r}").mkdir()
        (tmp_path / f"live-{r}" / "summary.json").write_text(json.dumps({"info": info, "summary": {}}))
        doc["sides"].append({"side": "live", "repeat": r})
    assert _reprobe(tmp_path, doc, model) == pytest.approx([1.1, 1.3, 0.9, 1.2], rel=1e-12)
    # A run that stored no probe steps (or a shape not in the probe grid): keep the old factor.
    info = json.loads((tmp_path / "live-1" / "summary.json").read_text())
    info["info"]["speed_probe_after"][0]["label"] = "prefill 7@0"
    (tmp_path / "live-1" / "summary.json").write_text(json.dumps(info))
    assert _reprobe(tmp_path, doc, model) is None
    del info["info"]["speed_probe_after"]
    (tmp_path / "live-1" / "summary.json").write_text(json.dumps(info))
    assert _reprobe(tmp_path, doc, model) is None


def test_the_serving_reference_is_another_sample_of_the_workload_over_its_first_seconds():
    from experiments.runner import reference_trace
    from simulator.workloads import WorkloadSpec, generate

    spec = WorkloadSpec.from_dict({**WORKLOAD, "num_requests": 50})
    ref = reference_trace(spec, Path("."), 3.0)
    other = list(generate(WorkloadSpec.from_dict({**WORKLOAD, "num_requests": 50, "seed": 3})))
    assert [r.arrival_time for r in ref] == [r.arrival_time for r in other[:len(ref)]]
    assert ref[-1].arrival_time - ref[0].arrival_time < 3.0 <= other[len(ref)].arrival_time - ref[0].arrival_time
    assert [r.request_id for r in ref] == [f"ref-{r.request_id}" for r in other[:len(ref)]]
    assert [(r.prompt_len, r.output_len) for r in ref] == [(r.prompt_len, r.output_len) for r in other[:len(ref)]]
    assert len(reference_trace(spec, Path("."), 1e-9)) == 1  # always at least one request
    by_count = reference_trace(spec, Path("."), 0.0, requests=20)
    assert [r.request_id for r in by_count] == [f"ref-{r.request_id}" for r in other[:20]]
    assert len(reference_trace(spec, Path("."), 0.0, requests=500)) == 50  # all of a shorter sample


def test_serving_reference_factors_are_measured_over_profiled_time_per_kind_pooled_over_runs(tmp_path):
    """Reference steps that ran 1.2x (decodes) and 0.9x (prefills) the profile's grid time give
    those serving factors, pooled over the point's counted runs; the simulator then prices steps
    with them instead of the probe-scaled profile factors."""
    from experiments.results import read_steps
    from experiments.runner import REFERENCE_DIR, _point_reference, _reference_factors
    from sagellm.config import SageLLMConfig
    from sagellm.graph import BatchShape
    from sagellm.models.presets import model_shape
    from simulator.cost.profiled import KNOTS, ProfiledCostModel

    shape = model_shape("smollm2-135m")
    model = ProfiledCostModel(shape, "float32", [0.02 + 0.001 * k for k in KNOTS] + [2e-11, 3e-12, 4e-10, 3e-3, 2e-4],
                              serving_factors={"decode": 1.5, "prefill": 1.5})
    decode = BatchShape.from_chunks([(100, 1)] * 5)
    mixed = BatchShape.from_chunks([(100, 1)] * 2 + [(0, 64)])
    doc = {"sides": [{"side": "simulate", "repeat": -1}]}
    for r in range(2):
        rows = ([{**asdict(decode), "seconds": 1.2 * model.predict(decode)}] * (25 + r)
                + [{**asdict(mixed), "seconds": 0.9 * model.predict(mixed)}] * 12
                + [{**asdict(BatchShape()), "seconds": 0.0}])  # an empty step is not counted
        (tmp_path / f"live-{r}" / REFERENCE_DIR).mkdir(parents=True)
        pd.DataFrame(rows).to_parquet(tmp_path / f"live-{r}" / REFERENCE_DIR / "steps.parquet")
        doc["sides"].append({"side": "live", "repeat": r})
    cfg = SageLLMConfig.from_dict({})
    factors = _point_reference(tmp_path, doc, model, cfg)
    assert factors["decode"] == pytest.approx(1.2) and factors["prefill"] == pytest.approx(0.9)
    assert factors["steps"] == 51 + 24 and 0.9 < factors["all"] < 1.2
    # One run alone has too few prefill steps (12 < 20) for a factor of their own: all steps' factor.
    one = _reference_factors([read_steps(tmp_path / "live-0" / REFERENCE_DIR)], model)
    assert one["prefill"] == one["all"] and one["decode"] == pytest.approx(1.2)
    model.use_serving_factors({k: factors[k] for k in ("all", "decode", "prefill")})
    assert model.batch_time(decode) == pytest.approx(1.2 * model.predict(decode))
    assert model.batch_time(mixed) == pytest.approx(0.9 * model.predict(mixed))
    with pytest.raises(ValueError, match="serving factors"):
        model.use_serving_factors({"all": 1.0, "decode": 0.0, "prefill": 1.0})
    # Paired: each run's own reference gives that run's factors (run 1's decodes ran slower here).
    from experiments.runner import _paired_references

    rows = [{**asdict(decode), "seconds": 1.5 * model.predict(decode)}] * 30
    pd.DataFrame(rows).to_parquet(tmp_path / "live-1" / REFERENCE_DIR / "steps.parquet")
    paired = _paired_references(tmp_path, doc, model, cfg)
    assert [r for r, _ in paired] == [0, 1]
    assert paired[0][1]["decode"] == pytest.approx(1.2) and paired[1][1]["decode"] == pytest.approx(1.5)
    assert paired[1][1]["steps"] == 30 and paired[1][1]["prefill"] == paired[1][1]["all"]
    # A reference after run 0 as well (decodes at 1.0x): run 0 is priced by both together.
    from experiments.runner import REFERENCE_AFTER_DIR

    (tmp_path / "live-0" / REFERENCE_AFTER_DIR).mkdir()
    rows = [{**asdict(decode), "seconds": 1.0 * model.predict(decode)}] * 25
    pd.DataFrame(rows).to_parquet(tmp_path / "live-0" / REFERENCE_AFTER_DIR / "steps.parquet")
    bracketed = dict(_paired_references(tmp_path, doc, model, cfg))
    assert bracketed[0]["decode"] == pytest.approx(1.1) and bracketed[0]["steps"] == 37 + 25
    assert bracketed[1] == paired[1][1]
    assert _point_reference(tmp_path, doc, model, cfg)["steps"] == 37 + 25 + 30
    # A counted run without a stored reference: no point factors (the probe's are used).
    doc["sides"].append({"side": "live", "repeat": 2})
    assert _point_reference(tmp_path, doc, model, cfg) is None
    assert _paired_references(tmp_path, doc, model, cfg) is None
    with pytest.raises(RuntimeError, match="no steps"):
        _reference_factors([pd.DataFrame()], model)


def test_the_serving_reference_prices_hand_offs_by_the_granularitys_link():
    """Hand-offs timed in a STRICT reference: measured / fitted link time, block-wise for the whole
    request's KV, layer-wise for one layer's piece (what is left after the prefill step)."""
    from experiments.runner import _handoff_link
    from sagellm.config import SageLLMConfig
    from sagellm.models.presets import model_shape
    from simulator.cost.profiled import KNOTS, ProfiledCostModel

    shape = model_shape("smollm2-135m")
    links = {"hbm->peer": {"bandwidth": 1e9, "latency": 1e-3, "serving_factor": 1.3},
             "hbm->peer_layer": {"bandwidth": 5e8, "latency": 2e-3, "serving_factor": 2.0}}
    model = ProfiledCostModel(shape, "float32", [0.02] * len(KNOTS) + [2e-11, 3e-12, 4e-10, 3e-3, 2e-4],
                              meta={"kv_links": links})
    pairs = [[3_000_000, 2 * (1e-3 + 3e-3)], [1_000_000, 2 * (1e-3 + 1e-3)]]  # twice the block link's fit
    block = _handoff_link(SageLLMConfig.from_dict({"kv_cache": {"granularity": "block"}}), model, pairs)
    assert block["name"] == "hbm->peer" and block["serving_factor"] == pytest.approx(2.0) and block["handoffs"] == 2
    piece = 3_000_000 / shape.num_layers
    layer_pairs = [[3_000_000, 0.5 * (2e-3 + piece / 5e8)]]
    layer = _handoff_link(SageLLMConfig.from_dict({"kv_cache": {"granularity": "layer"}}), model, layer_pairs)
    assert layer["name"] == "hbm->peer_layer" and layer["serving_factor"] == pytest.approx(0.5)
    assert _handoff_link(SageLLMConfig.from_dict({}), model, []) is None  # no hand-offs
    model.use_link_serving_factor("hbm->peer_layer", layer["serving_factor"])
    assert model.transfer_time(int(piece), "hbm", "peer_layer") == pytest.approx(layer_pairs[0][1])
    assert links["hbm->peer_layer"]["serving_factor"] == 2.0  # the profile's own links are not changed
    with pytest.raises(ValueError, match="no such link"):
        model.use_link_serving_factor("hbm->ddr", 1.0)


def test_paired_predictions_are_compared_median_to_median_and_keep_their_spread():
    from experiments.fidelity import compare, format_table

    measured = [{"tpot_mean": v, "ttft_mean": 1.0} for v in (0.10, 0.12, 0.20)]
    predicted = [{"tpot_mean": v, "ttft_mean": 1.1} for v in (0.11, 0.30, 0.125)]
    rows = {r.metric: r for r in compare(predicted, measured)}
    tpot = rows["tpot_mean"]
    assert tpot.predicted == pytest.approx(0.125) and tpot.measured == pytest.approx(0.12)
    assert (tpot.predicted_min, tpot.predicted_max) == (0.11, 0.30)
    assert tpot.relative_error == pytest.approx(0.125 / 0.12 - 1) and tpot.within
    assert rows["ttft_mean"].relative_error == pytest.approx(0.1)
    assert "sim spread" in format_table(list(rows.values())) and "110.0..300.0 ms" in format_table([tpot])
    single = compare({"tpot_mean": 0.125}, measured)[0]  # one simulation: no spread
    assert single.predicted_min is None and "sim spread" not in format_table([single])


def test_the_idle_probe_prices_a_run_at_the_speed_the_machine_had_during_it(tmp_path):
    """References timed while the machine ran 1.25x slow from 20 s on (the idle probe saw it) give
    the serving factor the machine has at its nominal speed; the run, slow from 10 s on, is priced
    with its own speed trace: each step at the multiplier of the window it starts in."""
    from experiments.fidelity import check_steps
    from experiments.results import IDLE_PROBE_FILE
    from experiments.runner import REFERENCE_AFTER_DIR, REFERENCE_DIR, _paired_references, _speed_of, _use_reference
    from sagellm.config import SageLLMConfig
    from sagellm.graph import BatchShape
    from sagellm.models.presets import model_shape
    from simulator.cost.profiled import KNOTS, ProfiledCostModel

    model = ProfiledCostModel(model_shape("smollm2-135m"), "float32",
                              [0.02 + 0.001 * k for k in KNOTS] + [2e-11, 3e-12, 4e-10, 3e-3, 2e-4])
    decode = BatchShape.from_chunks([(100, 1)] * 2)
    nominal = 0.008

    def write(where, seconds_per_step, slow_from):
        def slow(t):
            return 1.25 if t >= slow_from else 1.0

        where.mkdir(parents=True, exist_ok=True)
        t, rows = 0.0, []
        for _ in range(40):  # steps of ~35 ms, 0.9 s apart: some start in one window and end in the next
            start = t + 0.9
            s = seconds_per_step * slow(start)
            t = start + s
            rows.append({**asdict(decode), "seconds": s, "end_time": t, "worker": 0})
        pd.DataFrame(rows).to_parquet(where / "steps.parquet")
        ends = ([0.04 * i for i in range(1, round(slow_from / 0.04))]
                + [slow_from + 0.07 * i for i in range(1, 400)])  # fewer timings while slow
        probe = pd.DataFrame({"end_time": ends, "seconds": [nominal * slow(e) for e in ends]})
        probe.to_parquet(where / IDLE_PROBE_FILE)

    grid = model.predict(decode)
    for sub in (REFERENCE_DIR, REFERENCE_AFTER_DIR):
        write(tmp_path / "live-0" / sub, 1.1 * grid, 20.0)
    write(tmp_path / "live-0", 1.1 * grid, 10.0)
    doc = {"sides": [{"side": "live", "repeat": 0}]}
    ((repeat, ref),) = _paired_references(tmp_path, doc, model, SageLLMConfig.from_dict({}))
    assert ref["decode"] == pytest.approx(1.1)  # at nominal speed, the slow part taken out
    trace = ref["speed_trace"]
    assert trace["nominal_s"] == pytest.approx(nominal)
    speed = _speed_of(ref)
    assert speed(5.0) == pytest.approx(1.0) and speed(12.0) == pytest.approx(1.25)  # the run's trace
    _use_reference(model, ref)
    run_steps = pd.read_parquet(tmp_path / "live-0" / "steps.parquet")
    (overall,) = [c for c in check_steps(model, run_steps, speed) if c.kind == "all"]
    assert overall.relative_error == pytest.approx(0.0, abs=1e-9)
    (unpaced,) = [c for c in check_steps(model, run_steps) if c.kind == "all"]
    assert unpaced.relative_error < -0.1  # without the trace the run's slow part is missed
    # Without the probe's timings of the run, the run is priced as before (no trace).
    (tmp_path / "live-0" / IDLE_PROBE_FILE).unlink()
    ((_, plain),) = _paired_references(tmp_path, doc, model, SageLLMConfig.from_dict({}))
    assert "speed_trace" not in plain and plain["decode"] > 1.1
    # The run's timings were all in one busy stretch (too few per window): priced without the probe, and said so.
    sparse_probe = pd.DataFrame({"end_time": [1.0, 2.0], "seconds": [nominal, nominal]})
    sparse_probe.to_parquet(tmp_path / "live-0" / IDLE_PROBE_FILE)
    ((_, sparse),) = _paired_references(tmp_path, doc, model, SageLLMConfig.from_dict({}))
    assert sparse["speed_trace"] is None and _speed_of(sparse) is None and sparse["decode"] == plain["decode"]


def test_the_example_policy_runs_by_dotted_path_on_both_sides(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)  # the dotted path is found from the directory the command runs in
    cfg = ExperimentConfig.from_yaml(root / "examples" / "policies" / "deadline.yaml")
    run_dir = run_experiment(cfg, tmp_path, echo=lambda line: None, progress=False)
    summary = pd.read_csv(run_dir / "summary.csv")
    assert set(summary["side"]) == {"simulate", "live"}
    assert (summary["num_finished"] == 16).all()
    assert {"tenant_interactive_ttft_mean", "tenant_batch_ttft_mean"} <= set(summary.columns)
    live = pd.read_parquet(run_dir / "points" / "000" / "live-0" / "requests.parquet")
    assert set(live["tenant"]) == {"batch", "interactive"}


def test_a_profile_from_another_machine_makes_the_experiment_calibrate_and_say_why(monkeypatch, tmp_path):
    """The shipped profile of this machine's name, but recorded on another CPU model: with
    `calibrate: true` the experiment calibrates this machine first and says why (calibration
    itself, minutes long, is replaced by a recorder)."""
    import json
    from types import SimpleNamespace

    import simulator.commands as commands
    import simulator.cost.machine as machine
    from experiments.runner import _ensure_profiles
    from simulator.build import resolve_shape

    cfg = ExperimentConfig.from_dict({
        "name": "t", "hardware": "local", "sides": ["simulate"], "calibrate": True,
        "sagellm": {"model": {"dtype": "float32"}, "backend": {"num_threads": 1}}, "workload": WORKLOAD})
    sim = cfg.points[0].simulation
    shape = resolve_shape(sim.model, sim.sagellm, sim.base_dir)
    other = {**machine.machine_identity(), "family": "6", "model": "143", "vendor": "GenuineIntel"}
    (tmp_path / f"{machine.profile_id(shape, 'float32', threads=1)}.json").write_text(json.dumps({"machine": other}))
    real = machine.find_local_profile
    monkeypatch.setattr(machine, "find_local_profile",
                        lambda shape, dtype, threads=None: real(shape, dtype, tmp_path, threads))
    calibrated = []
    monkeypatch.setattr(commands, "calibrate", lambda engine_cfg: calibrated.append(engine_cfg)
                        or (tmp_path / "new.json", None, SimpleNamespace(median_error=0.01), 0))
    said: list[str] = []
    _ensure_profiles(cfg, said.append)
    assert len(calibrated) == 1
    assert "its profile: from another machine" in said[0] and "GenuineIntel, family 6 model 143" in said[0]
