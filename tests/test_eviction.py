"""KV eviction policies as plug-ins: the same decisions from the engine's loop and the simulator for
every registered policy and a user's own (dotted path), that they really differ, and clear errors
for a policy that cannot be found or trusted. (The block-leak property test in test_kv_property
runs under each of them too.)"""

from __future__ import annotations

import pytest
from engine_loop import FixedFakeExecutor, engine_loop_outputs
from registries import every_policy

from sagellm.config import ConfigError
from sagellm.core import KVCacheManager, Request, SamplingParams, Scheduler, SchedulerLimits, StepResult
from sagellm.core.kv import KVPolicy
from sagellm.core.policies import PolicyError
from sagellm.core.policies.eviction import EVICTION_POLICIES
from simulator.config import SimulationConfig
from simulator.cost.base import ConstantCostModel
from simulator.sim import Simulation

USER_EVICTION = "examples.policies.most_recent:MostRecentlyUsed"
EVERY_EVICTION, EVICTION_IDS = every_policy(EVICTION_POLICIES, USER_EVICTION, {"protect_hits": 2})

PREFIXED = {
    "num_requests": 160, "seed": 9,
    "arrival": {"kind": "poisson", "rate": 30.0},
    "prompt_len": {"kind": "uniform", "low": 10, "high": 60},
    "output_len": {"kind": "uniform", "low": 1, "high": 12},
    "shared_prefix": {"num_groups": 12, "length": 32, "fraction": 0.8},
}


def _config(eviction: str, args: dict | None) -> SimulationConfig:
    return SimulationConfig.from_dict({
        "name": "t", "model": "smollm2-135m", "hardware": "a100-80gb-sxm",
        "sagellm": {"scheduler": {"max_num_seqs": 6, "max_num_batched_tokens": 64},
                    "kv_cache": {"num_blocks": 60, "block_size": 4, "enable_prefix_caching": True,
                                 "ddr_num_blocks": 24, "cold_timeout_s": None,
                                 "eviction_policy": eviction, "eviction_policy_args": args}},
        "workload": PREFIXED})


@pytest.mark.parametrize("eviction, args", EVERY_EVICTION, ids=EVICTION_IDS)
def test_engine_loop_and_simulator_evict_identically(eviction: str, args: dict | None) -> None:
    config = _config(eviction, args)
    engine_outs, engine_records = engine_loop_outputs(config, FixedFakeExecutor(0.004))
    sim_outs: list = []
    sim = Simulation(config, cost_model=ConstantCostModel(0.004), on_step=lambda i, out: sim_outs.append(out))
    result = sim.run()
    assert sim.kv_stats()["evictions_hbm"] > 0 and sim.kv_stats()["evictions_ddr"] > 0, "the trace should evict"
    assert [o.to_dict() for o in sim_outs] == [o.to_dict() for o in engine_outs]
    assert sorted(r.request_id for r in result.records) == [r.request_id for r in engine_records]


def test_eviction_policies_really_decide_differently() -> None:
    outcomes = {}
    for eviction, args in EVERY_EVICTION:
        sim = Simulation(_config(eviction, args), cost_model=ConstantCostModel(0.004))
        sim.run()
        stats = sim.kv_stats()
        outcomes[eviction] = (stats["hit_blocks"], stats["evictions_hbm"], stats["evictions_ddr"])
    assert len(set(outcomes.values())) == len(outcomes)


def test_an_unknown_eviction_policy_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"kv_cache.eviction_policy: unknown eviction policy 'fifo'.*'lfu', 'lru'"):
        _config("fifo", None)
    with pytest.raises(ConfigError, match="kv_cache.eviction_policy: .* it has no method victim"):
        _config("examples.policies.tenant_home:TenantHome", None)
    with pytest.raises(ConfigError, match="kv_cache.eviction_policy_args: .*protect_hits must be"):
        _config(USER_EVICTION, {"protect_hits": 0})


class _Outsider:
    """Answers a block that is not evictable."""

    def victim(self, candidates, hits, now):
        return -1


def _serve(s: Scheduler, now: float) -> float:
    while s.has_unfinished():
        now += 1.0
        out = s.schedule(now)
        s.update(out, StepResult(out.step_id, {x.request_id: 0 for x in out.scheduled if x.samples}), now)
    return now


def test_an_eviction_policy_naming_a_block_that_is_not_evictable_is_caught(monkeypatch) -> None:
    import sagellm.core.kv.tiering as tiering

    monkeypatch.setattr(tiering, "make_eviction_policy", lambda spec, args: _Outsider())
    s = Scheduler(KVCacheManager(2, 2, KVPolicy(enable_prefix_caching=True)), SchedulerLimits(2, 64, max_model_len=100))
    s.add_request(Request("r0", [1, 1, 1], SamplingParams(max_new_tokens=1, ignore_eos=True), 0.0))
    now = _serve(s, 0.0)  # leaves one cached block behind
    s.add_request(Request("r1", [2, 2, 2], SamplingParams(max_new_tokens=1, ignore_eos=True), now))
    with pytest.raises(PolicyError, match="kv_cache.eviction_policy: _Outsider.victim returned -1, which is not"):
        _serve(s, now)  # needs both blocks: one eviction
