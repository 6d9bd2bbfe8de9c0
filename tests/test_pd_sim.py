"""Prefill/decode modes in the simulator: the STRICT cluster, its hand-off link, TIME_SHARE steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagellm.config import ConfigError
from simulator.config import SimulationConfig
from simulator.cost.base import ConstantCostModel
from simulator.pd_cluster import HandoffLink
from simulator.sim import Simulation

ROOT = Path(__file__).resolve().parent.parent


def _config(scheduler: dict, kv_cache: dict | None = None, **extra) -> SimulationConfig:
    return SimulationConfig.from_dict({
        "model": "smollm2-135m", "hardware": "a100-80gb-sxm",
        "sagellm": {"scheduler": {"max_num_batched_tokens": 256, **scheduler}, "kv_cache": kv_cache or {}},
        "workload": {"num_requests": 80, "seed": 3, "arrival": {"kind": "poisson", "rate": 20.0},
                     "prompt_len": {"kind": "uniform", "low": 20, "high": 300},
                     "output_len": {"kind": "uniform", "low": 1, "high": 40}},
        "slo": {"ttft_ms": 200, "tpot_ms": 50}, **extra})


def test_strict_cluster_finishes_every_request_with_one_handoff_each() -> None:
    sim = Simulation(_config({"mode": "strict", "prefill_workers": 2, "decode_workers": 3}),
                     cost_model=ConstantCostModel(0.01, transfer_seconds=0.002))
    result = sim.run()
    records = {r.request_id: r for r in result.records}
    assert len(records) == 80 and result.summary["num_unfinished"] == 0
    assert all(r.finish_reason == "length" for r in records.values())
    multi = [r for r in records.values() if r.num_output_tokens > 1]
    handoff = result.info["handoff"]
    assert handoff["count"] == len(multi)  # a one-token request ends on its prefill worker
    assert handoff["p50_s"] == pytest.approx(0.002)  # an idle link: one transfer, no wait
    assert handoff["mean_s"] >= 0.002 - 1e-12
    # the decode side received every handed-off prompt block through receive operations
    assert result.summary["handoff_mean_s"] == handoff["mean_s"]
    # prefill workers and decode workers both did work
    busy = result.info["replica_busy_seconds"]
    assert len(busy) == 5 and all(b > 0 for b in busy)


def test_strict_decode_steps_never_prefill_and_prefill_steps_never_decode() -> None:
    kinds: dict[int, set[str]] = {}

    def on_step(replica: int, out) -> None:
        for start, toks, samples in zip(out.start_positions, out.token_ids, out.samples):
            kinds.setdefault(replica, set()).add("d" if len(toks) == 1 and start > 0 and samples and
                                                 not out.handoff_ids else "p")

    Simulation(_config({"mode": "strict", "prefill_workers": 1, "decode_workers": 1}),
               cost_model=ConstantCostModel(0.01, 0.001), on_step=on_step).run()
    assert kinds[0] == {"p"}  # the prefill worker computes prompts only
    assert kinds[1] == {"d"}  # the decode worker only decodes (its prompts' KV is received)


def test_time_share_simulation_alternates_pure_steps() -> None:
    mixed = []
    kinds = set()

    def on_step(_: int, out) -> None:
        requests = sim.replicas[0].scheduler.requests
        decode = [s >= requests[rid].num_prompt_tokens for rid, s in zip(out.request_ids, out.start_positions)]
        mixed.append(any(decode) and not all(decode))
        kinds.add(all(decode))

    sim = Simulation(_config({"mode": "time_share", "time_share_decode_steps": 2}),
                     cost_model=ConstantCostModel(0.01), on_step=on_step)
    result = sim.run()
    assert result.summary["num_unfinished"] == 0 and len(result.records) == 80
    assert sum(mixed) == 0 and kinds == {True, False}


def test_handoff_link_block_and_layerwise() -> None:
    link = HandoffLink(ConstantCostModel(1.0, transfer_seconds=0.5))
    assert link.finish_time(1000, [10.0]) == 10.5
    assert link.finish_time(1000, [10.0]) == 11.0  # waits for the link
    layered = HandoffLink(ConstantCostModel(1.0, transfer_seconds=0.1))
    # four pieces ready at 1, 2, 3, 4 s: each leaves when ready; the last arrives 0.1 s after the step
    assert layered.finish_time(4000, [1.0, 2.0, 3.0, 4.0]) == pytest.approx(4.1)


def test_strict_needs_one_replica_and_names_the_field() -> None:
    with pytest.raises(ConfigError, match="cluster.num_replicas"):
        Simulation(_config({"mode": "strict"}, cluster={"num_replicas": 2}), cost_model=ConstantCostModel(0.01))


def test_roofline_prices_the_handoff_over_the_device_link() -> None:
    sim = Simulation(_config({"mode": "strict"}))
    a100 = sim.cost_model
    nbytes = 10**9
    assert a100.transfer_time(nbytes, "hbm", "peer") == pytest.approx(5e-6 + nbytes / 300e9)
    assert sim.run().info["handoff"]["count"] > 0


def test_layerwise_handoffs_use_their_own_link_when_the_profile_has_one() -> None:
    from simulator.cost.profiled import ProfiledCostModel

    paths = sorted((ROOT / "simulator" / "hardware" / "profiles").glob("*-1t__*.json"))  # one per machine
    assert paths
    model = ProfiledCostModel.load(paths[0])
    model.kv_links = {"hbm->peer": {"bandwidth": 1e9, "latency": 0.001}}
    # one timed link answers for both granularities
    assert model.transfer_time(10**6, "hbm", "peer_layer") == pytest.approx(0.002)
    model.kv_links["hbm->peer_layer"] = {"bandwidth": 0.5e9, "latency": 0.004}
    assert model.transfer_time(10**6, "hbm", "peer") == pytest.approx(0.002)
    assert model.transfer_time(10**6, "hbm", "peer_layer") == pytest.approx(0.006)
    # a layer-wise hand-off of 30 pieces: the pieces leave during the step, the layer link's
    # latency is paid after the last one
    link = HandoffLink(model, "peer_layer")
    ready = [1.0 + 0.01 * (i + 1) for i in range(30)]
    assert link.finish_time(30 * 10**6, ready) == pytest.approx(ready[-1] + 10**6 / 0.5e9 + 0.004)
    # a serving factor (hand-offs timed while both workers compute vs alone) scales the link
    model.kv_links["hbm->peer_layer"]["serving_factor"] = 1.5
    assert model.transfer_time(10**6, "hbm", "peer_layer") == pytest.approx(0.009)
    # a layer-wise simulation uses it
    sim = Simulation(_config({"mode": "strict"}, {"granularity": "layer"}), cost_model=model)
    assert all(isinstance(x, HandoffLink) and x.dst_tier == "peer_layer" for x in sim.strict.links)
