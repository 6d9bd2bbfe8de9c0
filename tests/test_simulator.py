"""The simulator makes the engine's decisions (parity), is deterministic, and agrees with queueing theory."""

from __future__ import annotations

import filecmp
import json

import pytest
from engine_loop import FixedFakeExecutor, engine_loop_outputs
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm.config import ConfigError, SageLLMConfig
from sagellm.core.request import Request
from sagellm.core.sampling import SamplingParams
from sagellm.graph import BatchShape
from sagellm.metrics import MetricsCollector, RequestRecord
from sagellm.metrics.io import write_run
from sagellm.metrics.records import inter_token_gaps
from simulator.build import build_scheduler
from simulator.config import SimulationConfig
from simulator.cost.base import ConstantCostModel
from simulator.sim import Simulation
from simulator.workloads import generate

POLICY = {"scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 64}, "kv_cache": {"num_blocks": 40}}
WORKLOAD = {
    "num_requests": 120,
    "seed": 3,
    "arrival": {"kind": "poisson", "rate": 40.0},
    "prompt_len": {"kind": "uniform", "low": 5, "high": 150},
    "output_len": {"kind": "uniform", "low": 1, "high": 40},
}


def _config(**overrides) -> SimulationConfig:
    d = {"name": "t", "model": "smollm2-135m", "hardware": "a100-80gb-sxm", "sagellm": POLICY, "workload": WORKLOAD}
    d.update(overrides)
    return SimulationConfig.from_dict(d)


def test_parity_engine_loop_and_simulator_make_identical_decisions():
    config = _config()
    engine_outs, engine_records = engine_loop_outputs(config, FixedFakeExecutor(0.004))
    sim_outs = []
    sim = Simulation(config, cost_model=ConstantCostModel(0.004), on_step=lambda i, out: sim_outs.append(out))
    result = sim.run()
    assert sum(1 for o in engine_outs if o.preempted_ids) > 0, "the trace should force preemptions"
    assert len(sim_outs) == len(engine_outs) > 100
    for a, b in zip(engine_outs, sim_outs):
        assert a.to_dict() == b.to_dict()
    sim_records = sorted(result.records, key=lambda r: r.request_id)
    assert len(sim_records) == len(engine_records) == config.workload.num_requests
    for a, b in zip(sim_records, engine_records):
        # simulated time may differ from the loop's clock by float rounding (SimPy adds delays to now)
        da, db = a.to_dict(), b.to_dict()
        for key in da:
            if isinstance(da[key], float):
                assert da[key] == pytest.approx(db[key], rel=1e-9, abs=1e-12), key
            else:
                assert da[key] == db[key], key


def test_same_config_and_seed_give_byte_identical_results(tmp_path):
    cfg = _config(cluster={"num_replicas": 2, "router": "least_outstanding"}, kv_sample_interval=0.0)
    dirs = []
    for k in range(2):
        r = Simulation(cfg).run()
        dirs.append(write_run(tmp_path / str(k), r.records, r.summary, r.kv_usage, r.info))
    for name in ("requests.csv", "summary.json", "kv_usage.csv"):
        assert filecmp.cmp(dirs[0] / name, dirs[1] / name, shallow=False), name
    other = Simulation(_config(workload={**WORKLOAD, "seed": 4})).run()
    assert [r.ttft for r in other.records] != [r.ttft for r in Simulation(cfg).run().records]


def test_requests_end_at_their_trace_output_length():
    cfg = _config()
    result = Simulation(cfg).run()
    want = {t.request_id: (t.prompt_len, t.output_len) for t in generate(cfg.workload)}
    assert len(result.records) == len(want)
    for r in result.records:
        assert (r.num_prompt_tokens, r.num_output_tokens) == want[r.request_id]
        assert r.finish_reason == "length"


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_mean_wait_matches_md1_theory(rho):
    """One replica, one request at a time, one-step requests, constant step time D, Poisson
    arrivals at rate rho / D: Pollaczek-Khinchine gives Wq = rho * D / (2 * (1 - rho))."""
    d = 0.01
    cfg = _config(
        sagellm={"scheduler": {"max_num_seqs": 1, "max_num_batched_tokens": 64}},
        workload={"num_requests": 200_000, "seed": 11, "arrival": {"kind": "poisson", "rate": rho / d},
                  "prompt_len": {"kind": "fixed", "value": 8}, "output_len": {"kind": "fixed", "value": 1}},
        kv_sample_interval=1e9,
    )
    result = Simulation(cfg, cost_model=ConstantCostModel(d)).run()
    waits = [r.queueing_delay for r in result.records]
    theory = rho * d / (2 * (1 - rho))
    measured = sum(waits) / len(waits)
    assert measured == pytest.approx(theory, rel=0.03)
    # and the service is exactly one step: TTFT = wait + D for every request
    assert all(r.ttft == pytest.approx(r.queueing_delay + d) for r in result.records[:1000])


def test_router_least_outstanding_balances_replicas():
    cfg = _config(cluster={"num_replicas": 3, "router": "least_outstanding"})
    result = Simulation(cfg).run()
    counts = [sum(1 for r in result.records if r.replica == k) for k in range(3)]
    assert min(counts) > 0.2 * len(result.records)
    rr = Simulation(_config(cluster={"num_replicas": 3, "router": "round_robin"})).run()
    assert [sum(1 for r in rr.records if r.replica == k) for k in range(3)] == [40, 40, 40]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hardware": "tpu-v9"}, "hardware"),
        ({"workload": {**WORKLOAD, "arrival": {"kind": "poisson", "rate": -1.0}}}, "workload.arrival.rate"),
        ({"workload": {**WORKLOAD, "output_len": {"kind": "fixed", "value": 0}}}, "workload.output_len"),
        ({"cluster": {"num_replicas": 0}}, "cluster.num_replicas"),
        ({"cluster": {"router": "fastest"}}, "cluster.router"),
        ({"sagellm": {"scheduler": {"max_num_seqz": 3}}}, "sagellm.scheduler.max_num_seqz"),
        ({"model": "no-such-model"}, "model"),
        ({"slo": {"ttft_ms": -5}}, "slo.ttft_ms"),
        ({"replicas": 2}, "replicas"),
    ],
)
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        Simulation(_config(**change))
    assert field in str(err.value)


def test_empty_trace_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n")
    with pytest.raises(ConfigError) as err:
        Simulation(_config(workload={"arrival": {"kind": "replay", "path": str(path)}})).run()
    assert "empty" in str(err.value) or "no rows" in str(err.value)


def test_model_that_does_not_fit_the_device_is_a_clear_error():
    with pytest.raises(ConfigError, match="hardware"):
        Simulation(_config(model="llama-2-13b", hardware="mlu370-x8",
                           sagellm={"model": {"dtype": "float32"}}))


def test_sagellm_config_is_the_engines():
    cfg = _config()
    assert isinstance(cfg.sagellm, SageLLMConfig)
    sim = Simulation(cfg)
    limits = sim.replicas[0].scheduler.limits
    assert limits == cfg.sagellm.scheduler.limits(limits.max_model_len)


def test_roofline_reproduces_a_hand_computed_h100_step():
    """Llama-2-7B in float16 on H100 SXM, one decode after 999 cached tokens (1,000 attended).

    Every operator is memory-bound at one token, so the step is (sum of bytes) / bandwidth /
    efficiency + overhead. Bytes per operator, by hand (2 bytes per element, h = 4096, MLP 11008,
    32 layers, vocabulary 32000):
    """
    from sagellm.core.outputs import SchedulerOutput
    from sagellm.models.presets import model_shape
    from simulator.cost.roofline import RooflineCostModel
    from simulator.hardware import load_spec

    per_layer = (
        2 * (2 * 4096 + 4096)                       # input RMSNorm: read x, write y, read weight
        + 2 * (4096 * 12288 + 4096 + 12288)         # fused QKV projection: weight, x in, q/k/v out
        + 2 * 2 * (4096 + 4096)                     # RoPE on q and k: read and write
        + 2 * 2 * 4096 * 2                          # write the new token's K and V
        + 2 * (2 * 1000 * 4096 + 2 * 4096)          # attention: read 1,000 tokens of K and V, q in, out
        + 2 * (4096 * 4096 + 4096 + 4096)           # output projection
        + 2 * 3 * 4096                              # residual add
        + 2 * (2 * 4096 + 4096)                     # post-attention RMSNorm
        + 2 * (4096 * 22016 + 4096 + 22016)         # fused gate/up projection
        + 2 * 3 * 11008                             # SiLU(gate) * up
        + 2 * (11008 * 4096 + 11008 + 4096)         # down projection
        + 2 * 3 * 4096                              # residual add
    )
    total_bytes = (
        2 * 4096 * 2                                # embedding lookup: read and write one row
        + 32 * per_layer
        + 2 * (2 * 4096 + 4096)                     # final RMSNorm
        + 2 * (4096 * 32000 + 4096 + 32000)         # LM head
    )
    assert total_bytes == 13_750_647_296  # 13.21 GB of weights (no embedding table), 0.52 GB of KV
    expected = total_bytes / 3.35e12 / 0.7 + 3.0e-3  # H100 SXM: 3.35 TB/s, efficiency 0.7, 3 ms per step

    spec = load_spec("h100-sxm")
    assert (spec.memory_bandwidth, spec.efficiency, spec.step_overhead) == (3.35e12, 0.7, 3.0e-3)
    model = RooflineCostModel(spec, model_shape("llama-2-7b"), "float16")
    out = SchedulerOutput(1, ("r",), (999,), ((5,),), ((),), (False,), (True,))
    assert model.step_time(out) == pytest.approx(expected, rel=1e-12)
    assert all(row.bound == "memory" for row in model.explain(BatchShape.from_output(out)))


def test_roofline_fast_formula_equals_operator_sum():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from sagellm.core.outputs import SchedulerOutput
    from sagellm.models.presets import model_shape
    from simulator.cost.roofline import RooflineCostModel
    from simulator.hardware import available_specs, load_spec

    models = [RooflineCostModel(load_spec(name), model_shape(m), "bfloat16")
              for name in available_specs() if "bfloat16" in load_spec(name).peak_flops
              for m in ("llama-2-7b", "qwen2-7b")]
    chunk = st.tuples(st.integers(0, 4000), st.integers(1, 600), st.booleans())

    @settings(max_examples=60, deadline=None)
    @given(st.lists(chunk, min_size=1, max_size=40))
    def check(chunks):
        out = SchedulerOutput(1, tuple(f"r{k}" for k in range(len(chunks))), tuple(c for c, _, _ in chunks),
                              tuple((0,) * n for _, n, _ in chunks), tuple(() for _ in chunks),
                              tuple(False for _ in chunks), tuple(s for _, _, s in chunks))
        batch = BatchShape.from_output(out)
        for m in models:
            assert m.step_time(out) == pytest.approx(m.batch_time(batch), rel=1e-12)

    check()


def test_simulate_command_prints_a_summary_and_writes_results(tmp_path, capsys):
    from sagellm.cli import main

    cfg = tmp_path / "sim.yaml"
    cfg.write_text(
        "name: cli\nmodel: llama-2-7b\nhardware: h100-sxm\n"
        "sagellm: {model: {dtype: bfloat16}, scheduler: {max_num_seqs: 32}}\n"
        "workload: {num_requests: 50, arrival: {kind: gamma, rate: 4.0, cv: 2.0},"
        " prompt_len: {kind: lognormal, median: 300, sigma: 0.8, max: 2000}, output_len: {kind: fixed, value: 20}}\n"
        "slo: {ttft_ms: 500, tpot_ms: 50}\n"
    )
    out_dir = tmp_path / "out"
    assert main(["simulate", str(cfg), "--output", str(out_dir), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "goodput" in printed and str(out_dir / "requests.csv") in printed
    rows = (out_dir / "requests.csv").read_text().splitlines()
    assert len(rows) == 51 and rows[0].startswith("request_id,replica,arrival_time")
    summary = json.loads((out_dir / "summary.json").read_text())["summary"]
    assert summary["num_finished"] == 50 and 0 < summary["goodput"] <= summary["request_throughput"]


def test_simulate_command_rejects_a_bad_config(tmp_path, capsys):
    from sagellm.cli import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("hardware: a100-80gb-sxm\nmodel: llama-2-7b\nworkload: {num_requests: 5, arrival: "
                   "{kind: poisson, rate: 1}, prompt_len: 10, output_len: 0}\n")
    assert main(["simulate", str(cfg), "--quiet"]) == 2
    assert "workload.output_len" in capsys.readouterr().err


def test_progress_bar_run_ends_and_matches_the_plain_run():
    """With a progress bar the run advances in slices of simulated time; it must end, same results."""
    plain = Simulation(_config()).run()
    with_bar = Simulation(_config()).run(progress=True)
    assert [r.to_dict() for r in with_bar.records] == [r.to_dict() for r in plain.records]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(0, 100, allow_nan=False), max_size=6), max_size=12),
       st.sampled_from([1, 2, 3, 1024]))
def test_collector_bulk_records_equal_one_by_one_records(token_times, flush_every):
    """The collector computes records and inter-token gaps in bulk; they are exactly the
    one-request-at-a-time values, whatever the batch boundaries and however many tokens each has."""
    collector = MetricsCollector()
    collector.FLUSH_EVERY = flush_every
    reqs = []
    for i, times in enumerate(token_times):
        req = Request(f"r{i}", [1, 2, 3], SamplingParams(max_new_tokens=50), 0.5 * i)
        req.token_times = sorted(times)
        req.output_token_ids = [7] * len(times)
        reqs.append(req)
        collector.add(req, i % 3)
    assert collector.num_records == len(reqs)
    assert collector.records == [RequestRecord.from_request(r, i % 3) for i, r in enumerate(reqs)]
    assert list(collector.inter_token_latencies) == [g for r in reqs for g in inter_token_gaps(r.token_times)]


def test_a_speed_trace_scales_each_step_by_the_machines_speed_when_it_starts():
    from simulator.speed_trace import SpeedTrace

    # windows of 10 s: the second has too few timings and keeps the first's multiplier
    ends = [0.5 * i for i in range(20)] + [12.0] + [20.0 + 0.5 * i for i in range(20)]
    secs = [0.010] * 20 + [0.050] + [0.015] * 20
    trace = SpeedTrace.from_probe(ends, secs, nominal_s=0.010, window_s=10.0, min_samples=10)
    assert trace.starts == (0.0, 10.0, 20.0) and trace.multipliers == pytest.approx((1.0, 1.0, 1.5))
    assert trace(-1.0) == 1.0 and trace(25.0) == trace(1e6) == pytest.approx(1.5)
    assert SpeedTrace.from_probe([1.0], [0.01], 0.01) is None  # no window has enough timings
    with pytest.raises(ValueError, match="increase"):
        SpeedTrace([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="> 0"):
        SpeedTrace([0.0], [0.0])

    config = _config()
    plain = Simulation(config, cost_model=ConstantCostModel(0.004)).run()
    doubled = Simulation(config, cost_model=ConstantCostModel(0.004), speed=lambda t: 2.0).run()
    assert doubled.summary == Simulation(config, cost_model=ConstantCostModel(0.008)).run().summary
    assert doubled.summary["tpot_mean"] > plain.summary["tpot_mean"]
    # A step is priced at the multiplier of the moment it starts.
    from simulator.executor import PredictedExecutor

    executor = PredictedExecutor(ConstantCostModel(0.004), speed=SpeedTrace([0.0, 10.0], [1.0, 2.0]))
    sched = build_scheduler(Simulation(config).shape, config.sagellm, config.sagellm.kv_cache.num_blocks)
    sched.add_request(Request("r", (1, 2, 3), SamplingParams(max_new_tokens=2, ignore_eos=True), 0.0))
    out = sched.schedule(0.0)
    assert executor.execute(out, 9.99).duration == pytest.approx(0.004)
    assert executor.execute(out, 10.0).duration == pytest.approx(0.008)
