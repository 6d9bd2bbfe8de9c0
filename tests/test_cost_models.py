"""Profiled cost model: fitting, held-out error, files; and `sagellm calibrate` end to end."""

from __future__ import annotations

import csv
import json
import random

import pytest

from sagellm.core.outputs import SchedulerOutput
from sagellm.graph import BatchShape
from sagellm.models.presets import model_shape
from simulator.cost.profiled import FEATURES, KNOTS, ProfiledCostModel, features, token_basis

SHAPE = model_shape("smollm2-135m")


def _batches(rng: random.Random, n: int) -> list[BatchShape]:
    out = []
    for i in range(n):
        if i % 3 == 0:  # decodes only, every count to 16 in turn (as the calibration grid has them)
            out.append(BatchShape.from_chunks([(rng.randint(1, 1500), 1) for _ in range(1 + (i // 3) % 16)]))
            continue
        chunks = [(rng.randint(1, 1500), 1) for _ in range(rng.choice([1, 2, 3, 4, 5, 6, rng.randint(0, 48)]))]
        if rng.random() < 0.6 or not chunks:
            chunks.append((rng.choice([0, 256, 1024]), rng.randint(8, 512)))
        out.append(BatchShape.from_chunks(chunks))
    return out


def _truth() -> ProfiledCostModel:
    """A plausible machine: token time rising steeply to 4 tokens, then about linearly."""
    token_values = [0.05 + 0.0018 * k + (0.03 if k >= 4 else 0.0) for k in KNOTS]
    return ProfiledCostModel(SHAPE, "float32", [*token_values, 2e-11, 1e-11, 3e-10, 0.01, 0.0005])


def test_fit_recovers_a_known_model_and_reports_heldout_error():
    rng = random.Random(0)
    truth = _truth()
    batches = _batches(rng, 120)
    seconds = [truth.predict(b) * (1 + rng.gauss(0, 0.01)) for b in batches]
    model, report = ProfiledCostModel.fit_with_holdout(SHAPE, "float32", batches, seconds)
    assert report.num_heldout == 30 and report.num_train == 90
    assert report.median_error < 0.02
    for b in _batches(random.Random(1), 20):
        assert model.predict(b) == pytest.approx(truth.predict(b), rel=0.05)
    assert all(c >= 0 for c in model.coefficients)
    for t in (1, 3, 4, 5, 100, 700):
        assert model.token_time(t) == pytest.approx(truth.token_time(t), rel=0.1)


def test_token_basis_interpolates_between_knots_and_extrapolates_proportionally():
    assert token_basis(0) == [0.0] * len(KNOTS)
    assert sum(token_basis(24)) == pytest.approx(1.0)
    assert token_basis(24)[KNOTS.index(16)] == pytest.approx(0.5)
    assert token_basis(24)[KNOTS.index(32)] == pytest.approx(0.5)
    assert all(token_basis(k)[KNOTS.index(k)] == 1.0 for k in range(1, 17))  # every row count to 16 is a knot
    assert token_basis(1024)[-1] == pytest.approx(2.0)
    old = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256, 512)
    assert token_basis(5, old)[old.index(4)] == pytest.approx(0.5) and len(token_basis(5, old)) == len(old)


def test_a_profile_keeps_the_knots_it_was_fitted_with(tmp_path):
    """A profile fitted with other knots (an older grid's) loads, predicts and refits with its own
    knots; a `features` list that is not knots-then-the-rest is a clear error."""
    from sagellm.config import ConfigError
    from simulator.commands import _read_samples, _refit
    from simulator.cost.profiled import feature_names, knots_of

    old = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256, 512)
    assert knots_of(list(feature_names(old))) == old and knots_of(list(FEATURES)) == KNOTS
    values = [0.05 + 0.0018 * k + (0.03 if k >= 4 else 0.0) for k in old]
    truth = ProfiledCostModel(SHAPE, "float32", [*values, 2e-11, 1e-11, 3e-10, 0.01, 0.0005], knots=old)
    rng = random.Random(7)
    batches = _batches(rng, 90)
    seconds = [truth.predict(b) for b in batches]
    model, _ = ProfiledCostModel.fit_with_holdout(SHAPE, "float32", batches, seconds, knots=old, meta={"id": "old"})
    path = tmp_path / "old.json"
    csv_text = ("label,num_tokens,num_seqs,num_decodes,num_sampled,attention_pairs,kv_context_tokens,"
                "median_s,min_s,max_s,repeats\n")
    csv_text += "".join(f"g{i},{b.num_tokens},{b.num_seqs},{b.num_decodes},{b.num_sampled},{b.attention_pairs},"
                        f"{b.kv_context_tokens},{t},{t},{t},1\n" for i, (b, t) in enumerate(zip(batches, seconds)))
    model.save(path, csv_text)
    doc = json.loads(path.read_text())
    assert doc["features"] == list(feature_names(old)) and len(doc["coefficients"]) == len(old) + 5
    loaded = ProfiledCostModel.load(path)
    assert loaded.knots == old
    probe = BatchShape.from_chunks([(300, 1)] * 5)
    assert loaded.predict(probe) == pytest.approx(model.predict(probe), rel=1e-12)
    assert loaded.predict(probe) == pytest.approx(truth.predict(probe), rel=0.02)
    refitted, _ = _refit(path, _read_samples(path.with_suffix(".csv")))
    assert refitted.knots == old and ProfiledCostModel.load(path).knots == old
    with pytest.raises(ValueError, match="coefficients"):
        ProfiledCostModel(SHAPE, "float32", [*values, 2e-11, 1e-11, 3e-10, 0.01, 0.0005])  # default knots: too few
    for bad in (["tokens_4", "tokens_2", *doc["features"][-5:]], ["tokens_x", *doc["features"][-5:]],
                doc["features"][:-1]):
        path.write_text(json.dumps({**doc, "features": bad}))
        with pytest.raises(ConfigError, match="features"):
            ProfiledCostModel.load(path)


def test_heldout_error_is_measured_on_unseen_samples():
    """A model that cannot describe the data must show it on held-out samples."""
    rng = random.Random(2)
    batches = _batches(rng, 60)
    seconds = [0.01 + 0.5 * (b.num_seqs % 2) for b in batches]  # depends on odd/even request counts: no feature sees it
    _, report = ProfiledCostModel.fit_with_holdout(SHAPE, "float32", batches, seconds)
    assert report.median_error > 0.05


def test_step_time_equals_predict_and_profile_round_trips(tmp_path):
    model = ProfiledCostModel(SHAPE, "bfloat16", [0.02 + 0.001 * k for k in KNOTS] + [2e-11, 3e-12, 4e-10, 0.003,
                                                                                       0.0002], meta={"id": "test"})
    rng = random.Random(3)
    for _ in range(50):
        chunks = [(rng.randint(0, 900), rng.choice([1, 1, rng.randint(1, 300)])) for _ in range(rng.randint(1, 30))]
        samples = tuple(rng.random() < 0.8 for _ in chunks)
        out = SchedulerOutput(1, tuple(f"r{k}" for k in range(len(chunks))), tuple(c for c, _ in chunks),
                              tuple((0,) * n for _, n in chunks), tuple(() for _ in chunks),
                              tuple(False for _ in chunks), samples)
        assert model.step_time(out) == pytest.approx(model.predict(BatchShape.from_output(out)), rel=1e-9)
    path = tmp_path / "p.json"
    model.save(path, "label\n")
    loaded = ProfiledCostModel.load(path)
    assert loaded.coefficients == model.coefficients and loaded.shape == model.shape
    assert json.loads(path.read_text())["features"] == list(FEATURES)
    assert path.with_suffix(".csv").read_text() == "label\n"


def test_serving_factors_are_fitted_per_step_kind_and_scale_together(tmp_path):
    """In-situ steps of decodes only ran 3% slower than the grid, steps with a prompt chunk 8%:
    each kind gets its own factor, and `step_time` picks it by the step's rows."""
    rng = random.Random(4)
    truth = _truth()
    grid = _batches(rng, 80)
    decode_steps = [BatchShape.from_chunks([(rng.randint(20, 900), 1) for _ in range(rng.randint(1, 40))])
                    for _ in range(40)]
    mixed_steps = [BatchShape.from_chunks([(0, rng.randint(16, 400))] + [(300, 1)] * rng.randint(0, 20))
                   for _ in range(30)]
    batches = grid + decode_steps + mixed_steps
    seconds = ([truth.predict(b) for b in grid] + [1.03 * truth.predict(b) for b in decode_steps]
               + [1.08 * truth.predict(b) for b in mixed_steps])
    in_situ = [False] * len(grid) + [True] * (len(decode_steps) + len(mixed_steps))
    model, _ = ProfiledCostModel.fit_with_holdout(SHAPE, "float32", batches, seconds, in_situ=in_situ)
    assert model.serving_factors["decode"] == pytest.approx(1.03, rel=1e-3)
    assert model.serving_factors["prefill"] == pytest.approx(1.08, rel=1e-3)
    assert 1.03 < model.serving_factor < 1.08

    def out(chunks):
        return SchedulerOutput(1, tuple(f"r{k}" for k in range(len(chunks))), tuple(c for c, _ in chunks),
                               tuple((0,) * n for _, n in chunks), tuple(() for _ in chunks),
                               tuple(False for _ in chunks), tuple(True for _ in chunks))

    decodes, mixed = out([(100, 1), (200, 1)]), out([(0, 64), (200, 1)])
    assert model.step_time(decodes) == pytest.approx(1.03 * model.predict(BatchShape.from_output(decodes)), rel=1e-3)
    assert model.step_time(mixed) == pytest.approx(1.08 * model.predict(BatchShape.from_output(mixed)), rel=1e-3)
    before = model.step_time(mixed)
    model.scale(1.5)
    assert model.step_time(mixed) == pytest.approx(1.5 * before)
    path = tmp_path / "p.json"
    model.save(path, "label\n")
    assert ProfiledCostModel.load(path).serving_factors == model.serving_factors
    # A profile from before the kinds (one factor) uses it for both.
    doc = json.loads(path.read_text())
    del doc["serving_factors"]
    path.write_text(json.dumps(doc))
    old = ProfiledCostModel.load(path)
    assert old.serving_factors == {"decode": old.serving_factor, "prefill": old.serving_factor}
    # Too few steps of a kind: the factor over all steps.
    few, _ = ProfiledCostModel.fit_with_holdout(SHAPE, "float32", grid + decode_steps + mixed_steps[:5],
                                                seconds[:len(grid) + len(decode_steps) + 5],
                                                in_situ=in_situ[:len(grid) + len(decode_steps) + 5])
    assert few.serving_factors["prefill"] == few.serving_factor != few.serving_factors["decode"]


def test_decode_steps_are_priced_by_their_row_bands_factor_when_serving_had_enough_of_them(tmp_path):
    """Serving ran decode steps of 4-5 rows 10% faster relative to the grid than steps of 1-3 rows
    (as on the AMD EPYC): a row band with `MIN_KIND_STEPS` steps gets its own factor and prices
    decode steps of its rows; a band with fewer steps takes the decode factor."""
    from simulator.cost.profiled import MIN_KIND_STEPS, decode_band

    truth = _truth()
    rng = random.Random(9)

    def decodes(rows):
        return BatchShape.from_chunks([(rng.randint(20, 900), 1) for _ in range(rows)])

    small = [decodes(1 + i % 3) for i in range(3 * MIN_KIND_STEPS)]
    four_five = [decodes(4 + i % 2) for i in range(MIN_KIND_STEPS)]
    rare = [decodes(7) for _ in range(MIN_KIND_STEPS - 1)]
    prompts = [BatchShape.from_chunks([(0, rng.randint(16, 400)), (300, 1)]) for _ in range(MIN_KIND_STEPS)]
    steps = small + four_five + rare + prompts
    seconds = ([1.0 * truth.predict(b) for b in small] + [0.9 * truth.predict(b) for b in four_five]
               + [0.95 * truth.predict(b) for b in rare] + [1.1 * truth.predict(b) for b in prompts])
    factors, _ = truth.serving_factors_of(steps, seconds, [], [])
    assert [decode_band(n) for n in (2, 5, 40)] == ["decode_rows_2", "decode_rows_4-5", "decode_rows_17+"]
    assert factors["decode_rows_1"] == pytest.approx(1.0) and factors["decode_rows_4-5"] == pytest.approx(0.9)
    assert "decode_rows_6-8" not in factors  # 19 steps: too few for a factor of their own
    assert 0.9 < factors["decode"] < 1.0 and factors["prefill"] == pytest.approx(1.1)

    model = ProfiledCostModel(SHAPE, "float32", truth.coefficients)
    model.use_serving_factors(factors)
    for batch, measured in zip(steps, seconds):
        if batch.num_seqs != 7:
            assert model.batch_time(batch) == pytest.approx(measured)
    seven = rare[0]
    assert model.batch_time(seven) == pytest.approx(factors["decode"] * truth.predict(seven))
    model.scale(2.0)
    assert model.batch_time(four_five[0]) == pytest.approx(2 * 0.9 * truth.predict(four_five[0]))
    path = tmp_path / "p.json"
    model.save(path, "label\n")
    assert ProfiledCostModel.load(path).serving_factors == model.serving_factors
    with pytest.raises(ValueError, match="decode row bands"):
        model.use_serving_factors({"all": 1.0, "decode": 1.0, "prefill": 1.0, "decode_rows_99": 1.0})


def test_serving_factors_are_relative_to_the_speed_probe_timed_around_the_serving_steps():
    """The machine ran 1.25x slower while the serving steps were timed than while the grid was: the
    probe timed around them shows it, and the serving factors keep only the serving loop's own cost
    (here 1.04 for both kinds). The probe samples are never fitted."""
    rng = random.Random(5)
    truth = _truth()
    grid = _batches(rng, 80)
    steps = [BatchShape.from_chunks([(rng.randint(20, 900), 1) for _ in range(rng.randint(1, 40))])
             for _ in range(30)] + [BatchShape.from_chunks([(0, rng.randint(16, 400)), (300, 1)]) for _ in range(25)]
    probe = [BatchShape.from_chunks([(0, 256)]), BatchShape.from_chunks([(240, 1)] * 4)]
    batches = grid + steps + probe
    seconds = ([truth.predict(b) for b in grid] + [1.25 * 1.04 * truth.predict(b) for b in steps]
               + [1.25 * truth.predict(b) for b in probe])
    flags = [False] * len(grid) + [True] * len(steps) + [False] * len(probe)
    is_probe = [False] * (len(grid) + len(steps)) + [True] * len(probe)
    model, _ = ProfiledCostModel.fit_with_holdout(SHAPE, "float32", batches, seconds, in_situ=flags, probe=is_probe)
    # (within the fit's own error on these shapes, about 1%)
    assert model.meta["in_situ_probe_speed"] == pytest.approx(1.25, rel=0.015)
    assert model.serving_factors["decode"] == pytest.approx(1.04, rel=0.015)
    assert model.serving_factors["prefill"] == pytest.approx(1.04, rel=0.015)
    # without the probe, the machine's slowdown would count as serving cost
    unaware, _ = ProfiledCostModel.fit_with_holdout(SHAPE, "float32", batches[:-2], seconds[:-2], in_situ=flags[:-2])
    assert unaware.serving_factors["decode"] == pytest.approx(1.3, rel=0.015)
    # probe samples far off the model do not move the fit: they are not fitted
    skewed = seconds[:-2] + [50 * s for s in seconds[-2:]]
    far, _ = ProfiledCostModel.fit_with_holdout(SHAPE, "float32", batches, skewed, in_situ=flags, probe=is_probe)
    assert far.coefficients == pytest.approx(model.coefficients, rel=1e-9)


def test_a_schedule_modes_own_serving_factors_price_its_simulations_only(tmp_path):
    """Steps timed in situ on a STRICT cluster (labelled "in situ@strict", with their own speed
    probe) give STRICT's serving factors: they are not fitted into the grid model, the default
    factors stay, and only simulations in mode strict use them."""
    from sagellm.config import SageLLMConfig
    from sagellm.engine.calibration import CalibrationSample
    from simulator.build import build_cost_model
    from simulator.commands import _read_samples, _refit, _samples_csv, mode_of_label

    rng = random.Random(6)
    truth = _truth()
    grid = [CalibrationSample(f"grid {k}", b, truth.predict(b), 0, 0, 1) for k, b in enumerate(_batches(rng, 80))]
    decodes = [BatchShape.from_chunks([(rng.randint(20, 900), 1) for _ in range(rng.randint(1, 30))])
               for _ in range(30)]
    prompts = [BatchShape.from_chunks([(0, rng.randint(16, 256))]) for _ in range(25)]
    probe = [BatchShape.from_chunks([(0, 256)]), BatchShape.from_chunks([(240, 1)] * 4)]

    def timed(label, batches, factor):
        return [CalibrationSample(label, b, factor * truth.predict(b), 0, 0, 1) for b in batches]

    # default (HYBRID) run: decodes x1.03, prompts x1.07 on a machine at 1.0x; the STRICT run:
    # decodes x1.15, prompt steps x1.30 on a machine 1.2x slower than the grid
    samples = (grid + timed("probe: p", probe, 1.0) + timed("in situ", decodes, 1.03) + timed("in situ", prompts, 1.07)
               + timed("probe@strict: p", probe, 1.2) + timed("in situ@strict", decodes, 1.2 * 1.15)
               + timed("in situ@strict", prompts, 1.2 * 1.30))
    assert mode_of_label("in situ@strict") == mode_of_label("probe@strict: 4 decodes@240") == "strict"
    assert mode_of_label("in situ") is mode_of_label("probe: x") is mode_of_label("prefill 8@256") is None
    path = tmp_path / "p.json"
    ProfiledCostModel(SHAPE, "float32", truth.coefficients, {"id": "p"}).save(path, _samples_csv(grid, truth))
    base_path = tmp_path / "base.json"
    base_path.write_text(path.read_text())
    base_path.with_suffix(".csv").write_text(path.with_suffix(".csv").read_text())
    base, _ = _refit(base_path, [s for s in samples if mode_of_label(s.label) is None])
    model, _ = _refit(path, samples)
    assert model.coefficients == pytest.approx(base.coefficients, rel=1e-9)  # STRICT's steps are not fitted

    def ratio(batches, factor):  # measured / predicted by the fitted model
        return factor * sum(truth.predict(b) for b in batches) / sum(model.predict(b) for b in batches)

    assert model.serving_factors["decode"] == pytest.approx(ratio(decodes, 1.03) / ratio(probe, 1.0), rel=1e-9)
    assert model.serving_factors["prefill"] == pytest.approx(ratio(prompts, 1.07) / ratio(probe, 1.0), rel=1e-9)
    strict = model.mode_serving_factors["strict"]
    assert strict["decode"] == pytest.approx(ratio(decodes, 1.2 * 1.15) / ratio(probe, 1.2), rel=1e-9)
    assert strict["prefill"] == pytest.approx(ratio(prompts, 1.2 * 1.30) / ratio(probe, 1.2), rel=1e-9)
    assert strict["decode"] == pytest.approx(1.15, rel=0.05) and strict["prefill"] == pytest.approx(1.30, rel=0.05)
    assert model.meta["in_situ_by_mode"]["strict"]["probe_speed"] == pytest.approx(ratio(probe, 1.2), rel=1e-9)

    # Saved and loaded with the profile; --refit recomputes them from the samples.
    _refit(path, _read_samples(path))
    again = ProfiledCostModel.load(path)
    assert again.mode_serving_factors["strict"] == pytest.approx(strict, rel=1e-4)  # (CSV keeps 6 decimals)
    for mode, factors in (("strict", strict), ("hybrid", model.serving_factors), ("time_share", model.serving_factors)):
        sagellm = SageLLMConfig().replace(scheduler={"mode": mode})
        cost, _ = build_cost_model(str(path), SHAPE, sagellm)
        assert cost.serving_factors["decode"] == pytest.approx(factors["decode"], rel=1e-4)
        assert cost.serving_factors["prefill"] == pytest.approx(factors["prefill"], rel=1e-4)
    doc = json.loads(path.read_text())
    doc["serving_factors_by_mode"]["strict"]["decode"] = -1.0
    path.write_text(json.dumps(doc))
    with pytest.raises(Exception, match="serving_factors_by_mode.strict"):
        ProfiledCostModel.load(path)


def test_features_follow_the_graph():
    decode = BatchShape.from_chunks([(100, 1)])
    two = BatchShape.from_chunks([(100, 1), (100, 1)])
    f1, f2 = features(SHAPE, "float32", decode), features(SHAPE, "float32", two)
    names = dict(zip(FEATURES, f2))
    assert names["tokens_2"] == 1.0 and f1[0] == 1.0          # token basis at 2 and 1 tokens
    assert names["attention_flops"] == pytest.approx(2 * dict(zip(FEATURES, f1))["attention_flops"])
    assert names["decodes"] == 2 and names["prefill_chunks"] == 0


@pytest.mark.slow
def test_calibrate_command_writes_a_profile_the_simulator_uses(tmp_path):
    from sagellm.cli import main
    from simulator.config import SimulationConfig
    from simulator.sim import Simulation

    assert main(["calibrate", "--quick", "--repeats", "1", "--quiet", "--output-dir", str(tmp_path)]) == 0
    (profile,) = tmp_path.glob("*.json")
    doc = json.loads(profile.read_text())
    assert doc["heldout"]["num_heldout"] >= 1 and doc["machine"]["cpu_count"] >= 1
    assert doc["cpu_steal"] is None or 0.0 <= doc["cpu_steal"] <= 1.0
    rows = profile.with_suffix(".csv").read_text().splitlines()
    assert rows[0].startswith("label,num_tokens") and len(rows) > 10
    cfg = SimulationConfig.from_dict({
        "hardware": str(profile),
        "workload": {"num_requests": 20, "arrival": {"kind": "poisson", "rate": 2.0},
                     "prompt_len": {"kind": "uniform", "low": 10, "high": 200}, "output_len": 16},
    })
    result = Simulation(cfg).run()
    assert result.summary["num_finished"] == 20 and result.info["cost_model"].startswith("profiled(")

    # Serving steps timed again on a two-worker cluster, with the speed probe around them.
    assert main(["calibrate", "--in-situ", str(profile), "--in-situ-replicas", "2", "--in-situ-requests", "6",
                 "--in-situ-runs", "2"]) == 0
    doc = json.loads(profile.read_text())
    assert doc["in_situ"]["replicas"] == 2 and doc["in_situ"]["requests"] == 6 and doc["in_situ"]["runs"] == 2
    with profile.with_suffix(".csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    situ = [r for r in rows if r["label"] == "in situ"]
    probe = [r for r in rows if r["label"].startswith("probe: ")]
    assert situ and len(probe) >= 4 * 2 * 2 and len(rows) > len(situ) + len(probe) > 10  # the grid samples stay

    def ratio(rs):
        return sum(float(r["median_s"]) for r in rs) / sum(float(r["predicted_s"]) for r in rs)

    assert doc["in_situ_probe_speed"] == pytest.approx(ratio(probe), rel=1e-4)
    assert doc["serving_factor"] == pytest.approx(ratio(situ) / ratio(probe), rel=1e-4)


def test_fit_link_recovers_an_affine_link_and_falls_back_to_the_origin() -> None:
    from sagellm.engine.kv_calibration import fit_link

    sizes = [1e5, 1e6, 1e7, 1e8]
    link = fit_link(sizes, [0.002 + x / 2e9 for x in sizes])
    assert link["latency"] == pytest.approx(0.002) and link["bandwidth"] == pytest.approx(2e9)
    # larger copies that are faster cannot be a link with positive bandwidth and latency
    flat = fit_link([1e6, 2e6], [0.002, 0.001])
    assert flat["latency"] == 0.0 and flat["bandwidth"] > 0


def test_the_calibration_workload_is_seeded_and_fits_the_context() -> None:
    from sagellm.engine.calibration import poisson_requests

    timed = poisson_requests(30, 2.0, 7, 1000, 200, "w")
    assert timed == poisson_requests(30, 2.0, 7, 1000, 200, "w")
    times = [t for t, _ in timed]
    assert times == sorted(times) and times[0] > 0
    for _, req in timed:
        assert 8 <= req.max_new_tokens <= 96 and len(req.prompt_token_ids) + req.max_new_tokens < 200
        assert req.ignore_eos and req.temperature == 0.0 and max(req.prompt_token_ids) < 1000
    assert [r.request_id for _, r in timed[:2]] == ["w-0", "w-1"]


@pytest.mark.parametrize("flags, isa", [
    ("fpu sse2 avx avx2 fma", "avx2"),
    ("fpu avx avx2 avx512f avx512bw avx512_bf16", "avx512"),
    ("fpu sse2 avx", "avx"),
    ("fpu sse2", ""),
])
def test_the_vector_isa_is_the_widest_the_cpu_flags_list(flags, isa):
    from sagellm.backends.cpuinfo import cpu_vector_isa

    lines = ["processor\t: 0\n", "model name\t: Some CPU\n", f"flags\t\t: {flags}\n", "processor\t: 1\n"]
    assert cpu_vector_isa(lines) == isa
    assert cpu_vector_isa(["processor\t: 0\n", "Features\t: fp asimd sve\n"]) == "sve"  # arm64 names them Features


def _pretend_machine(monkeypatch, isa: str = "avx512", family: str = "25", model: str = "17",
                     flags: tuple[str, ...] = ("avx2", "avx512f")) -> None:
    import simulator.cost.machine as machine

    monkeypatch.setattr(machine, "cpu_vector_isa", lambda: isa)
    monkeypatch.setattr(machine, "cpu_model_name", lambda: "AMD EPYC")
    monkeypatch.setattr(machine, "cpu_identity", lambda: {"vendor": "AuthenticAMD", "family": family,
                                                          "model": model, "stepping": "1", "flags": list(flags)})
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)


def test_a_machine_that_hides_avx512_gets_a_profile_of_its_own(monkeypatch):
    """The same CPU model with and without AVX-512 runs steps at different speeds (seen on this
    project's AMD EPYC VMs), so 'local' must not price one with the other's profile; nor may
    another model of the same name and family."""
    import simulator.cost.machine as machine

    ids = {}
    for isa in ("avx512", "avx2", ""):
        _pretend_machine(monkeypatch, isa=isa)
        ids[isa] = machine.profile_id(SHAPE, "float32")
        assert machine.machine_identity()["isa"] == isa
    assert ids["avx512"].startswith("cpu-amd-epyc-f25m17-avx512-2c__")
    assert ids["avx2"].startswith("cpu-amd-epyc-f25m17-avx2-2c__")
    assert ids[""].startswith("cpu-amd-epyc-f25m17-2c__") and len(set(ids.values())) == 3
    _pretend_machine(monkeypatch, model="160")
    assert machine.profile_id(SHAPE, "float32").startswith("cpu-amd-epyc-f25m160-avx512-2c__")


def test_the_cpu_identity_reads_vendor_family_model_and_the_flags_that_select_kernels():
    from sagellm.backends.cpuinfo import cpu_identity

    x86 = ["processor\t: 0\n", "vendor_id\t: GenuineIntel\n", "cpu family\t: 6\n", "model\t\t: 143\n",
           "model name\t: Intel(R) Xeon(R) Processor\n", "stepping\t: 8\n",
           "flags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 sse2\n", "\n",
           "processor\t: 1\n", "cpu family\t: 99\n"]
    assert cpu_identity(x86) == {"vendor": "GenuineIntel", "family": "6", "model": "143", "stepping": "8",
                                 "flags": ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]}
    arm = ["processor\t: 0\n", "Features\t: fp asimd sve\n", "CPU implementer\t: 0x41\n",
           "CPU variant\t: 0x1\n", "CPU part\t: 0xd40\n"]
    assert cpu_identity(arm) == {"flags": ["asimd", "sve"], "vendor": "0x41", "stepping": "0x1", "model": "0xd40"}


def test_a_profile_timed_on_another_machine_is_refused_naming_both(monkeypatch, tmp_path):
    """A profile found by name but recorded on another CPU model, with other kernel-selecting
    flags, or recording no model at all, is not used: the error names both machines and the fix."""
    import simulator.cost.machine as machine
    from sagellm.config import ConfigError

    _pretend_machine(monkeypatch)
    here = machine.machine_identity()
    path = tmp_path / f"{machine.profile_id(SHAPE, 'float32')}.json"
    path.write_text(json.dumps({"machine": here}))
    assert machine.find_local_profile(SHAPE, "float32", tmp_path) == path
    for other in ({**here, "model": "160"}, {**here, "flags": ["avx2"]},
                  {"cpu": "AMD EPYC", "isa": "avx512", "cpu_count": 2, "system": "Linux"}):
        path.write_text(json.dumps({"machine": other}))
        with pytest.raises(ConfigError, match=r"calibrated on another machine \(AMD EPYC.*than this one \(AMD EPYC, "
                                              r"AuthenticAMD, family 25 model 17, flags avx2 avx512f, 2 cores.*"
                                              r"sagellm calibrate --dtype float32"):
            machine.find_local_profile(SHAPE, "float32", tmp_path)
