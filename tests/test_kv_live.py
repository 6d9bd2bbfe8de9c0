"""The KV runtime on the live engine: same greedy tokens with caching, tiers and swapping; corrupt
NVMe blocks are recomputed, never served; and the simulator makes the same KV decisions."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from sagellm.engine.types import GenerateRequest
from simulator.config import SimulationConfig
from simulator.sim import Simulation
from simulator.trace_io import TraceRequest, write_trace
from simulator.workloads import WorkloadSpec, generate, prompt_token_ids
from tests.conftest import start_engine

pytestmark = pytest.mark.slow

WAVE_GAP = 1000.0  # simulated seconds between waves: each wave ends long before the next


def multi_turn_trace() -> list[TraceRequest]:
    """3 conversations x 3 turns; wave k holds every conversation's turn k."""
    spec = WorkloadSpec.from_dict({
        "num_requests": 9, "seed": 3, "arrival": {"kind": "poisson", "rate": 1.0},
        "prompt_len": {"kind": "uniform", "low": 120, "high": 200}, "output_len": {"kind": "fixed", "value": 8},
        "conversation": {"turns": 3, "user_len": {"kind": "uniform", "low": 10, "high": 30}, "think_time_s": 1.0}})
    rows = [dataclasses.replace(r, arrival_time=WAVE_GAP * int(r.request_id[-2:])) for r in generate(spec)]
    return sorted(rows, key=lambda r: (r.arrival_time, r.request_id))


def shared_prefix_trace() -> list[TraceRequest]:
    """12 requests over 2 system prompts of 64 tokens, in 2 waves of 6."""
    spec = WorkloadSpec.from_dict({
        "num_requests": 12, "seed": 5, "arrival": {"kind": "constant", "rate": 1.0},
        "prompt_len": {"kind": "uniform", "low": 80, "high": 140}, "output_len": {"kind": "fixed", "value": 8},
        "shared_prefix": {"num_groups": 2, "length": 64}})
    return [dataclasses.replace(r, arrival_time=WAVE_GAP * (i // 6)) for i, r in enumerate(generate(spec))]


def run_live(config: dict[str, Any], trace: list[TraceRequest]) -> tuple[dict[str, tuple[int, ...]], dict, Any]:
    """Each wave through `generate_batch` (admitted at once, as the simulator's arrivals at one instant)."""
    eng = start_engine(config)
    try:
        vocab = eng.shape.vocab_size
        outputs: dict[str, tuple[int, ...]] = {}
        for t in sorted({r.arrival_time for r in trace}):
            wave = [GenerateRequest(prompt_token_ids=tuple(prompt_token_ids(r, vocab, i)), request_id=r.request_id,
                                    max_new_tokens=r.output_len, temperature=0.0, ignore_eos=True)
                    for i, r in enumerate(trace) if r.arrival_time == t]
            for out in eng.generate_batch(wave):
                assert out.finish_reason == "length", out.error if hasattr(out, "error") else out
                outputs[out.request_id] = tuple(out.token_ids)
        return outputs, eng.get_stats()["kv"], eng
    finally:
        eng.shutdown()


def kv_config(**kv: Any) -> dict[str, Any]:
    return {"model": {"dtype": "float32", "max_model_len": 1024}, "kv_cache": {"block_size": 16, **kv}}


TIERED = {"num_blocks": 30, "enable_prefix_caching": True, "ddr_num_blocks": 8, "nvme_num_blocks": 64,
          "cold_timeout_s": None}


@pytest.fixture(scope="module")
def baseline() -> dict[str, dict[str, tuple[int, ...]]]:
    return {name: run_live(kv_config(num_blocks=200), trace())[0]
            for name, trace in (("multi_turn", multi_turn_trace), ("shared_prefix", shared_prefix_trace))}


@pytest.mark.parametrize("kv", [
    {"num_blocks": 200, "enable_prefix_caching": True},
    TIERED,
    {**TIERED, "granularity": "layer"},
    {"num_blocks": 36, "granularity": "request", "ddr_num_blocks": 64},
], ids=["prefix-caching", "ddr-nvme-tiers", "layer-wise-tiers", "request-swapping"])
def test_greedy_outputs_equal_those_without_caching(kv: dict, baseline: dict) -> None:
    got, stats, _ = run_live(kv_config(**kv), multi_turn_trace())
    assert got == baseline["multi_turn"]
    if kv.get("enable_prefix_caching"):
        assert stats["hit_rate"] > 0.4
    if "nvme_num_blocks" in kv:
        assert stats["hit_blocks_ddr"] > 0 and stats["hit_blocks_nvme"] > 0
    if kv.get("granularity") == "request":
        assert stats["swaps_in"] > 0


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_a_damaged_nvme_block_is_detected_and_recomputed(damage: str, baseline: dict, monkeypatch) -> None:
    """NVMe only below the device: evicted blocks go to the file. Between waves the file is damaged;
    the loads that read it fail their checksum, the requests are recomputed, outputs stay right."""
    from sagellm.engine import engine as engine_module

    kv = {"num_blocks": 30, "enable_prefix_caching": True, "nvme_num_blocks": 200, "cold_timeout_s": None}
    original = engine_module.SageLLMEngine.generate_batch
    calls = {"n": 0}

    def damaging_generate_batch(self, requests, **kwargs):
        if calls["n"] > 0:
            store = self.kv_transfers.nvme
            if damage == "corrupt":
                with open(store.path, "r+b") as f:
                    for slot in store.checksums:
                        f.seek(slot * store.block_nbytes + 100)
                        f.write(b"\x7f" * 64)
            else:
                with open(store.path, "r+b") as f:
                    f.truncate(store.block_nbytes // 2)
        calls["n"] += 1
        return original(self, requests, **kwargs)

    monkeypatch.setattr(engine_module.SageLLMEngine, "generate_batch", damaging_generate_batch)
    got, stats, _ = run_live(kv_config(**kv), multi_turn_trace())
    assert stats["load_failures"] > 0 and stats["hit_blocks_nvme"] > 0
    assert got == baseline["multi_turn"]


@pytest.mark.parametrize("trace_fn", [shared_prefix_trace, multi_turn_trace], ids=["shared-prefix", "multi-turn"])
@pytest.mark.parametrize("kv", [{"num_blocks": 200, "enable_prefix_caching": True}, TIERED],
                         ids=["hbm", "ddr-nvme"])
def test_simulator_and_engine_make_the_same_kv_decisions(trace_fn, kv: dict, tmp_path: Path) -> None:
    trace = trace_fn()
    path = tmp_path / "trace.jsonl"
    write_trace(path, trace)
    _, live_stats, _ = run_live(kv_config(**kv), trace)
    sim = Simulation(SimulationConfig.from_dict({
        "name": "same-decisions", "hardware": "local", "sagellm": kv_config(**kv),
        "workload": {"arrival": {"kind": "replay", "path": str(path)}}}))
    sim.run()
    sim_stats = sim.replicas[0].scheduler.kv.stats.to_dict()
    assert sim_stats == live_stats
    assert live_stats["hit_blocks"] > 0
