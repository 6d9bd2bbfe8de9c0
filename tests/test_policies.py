"""Scheduling policies as plug-ins: the same decisions live and simulated for every registered
policy and a user's own (dotted path), no leaked block under any of them, what each policy does,
and clear errors for a policy that cannot be found, built or trusted."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from engine_loop import FixedFakeExecutor, engine_loop_outputs
from hypothesis import given, settings
from hypothesis import strategies as st
from registries import every_policy
from scheduler_actions import actions, run_actions

from sagellm.config import ConfigError, SageLLMConfig
from sagellm.core import KVCacheManager, Request, SamplingParams, Scheduler, SchedulerLimits, StepResult
from sagellm.core.policies import SCHEDULING_POLICIES, PolicyError, make_scheduling_policy
from simulator.config import SimulationConfig
from simulator.cost.base import ConstantCostModel
from simulator.sim import Simulation

USER_POLICY = "examples.policies.deadline:EarliestDeadlineFirst"
USER_ARGS = {"ttft_targets_s": {"interactive": 0.05, "batch": 2.0}}
EVERY_POLICY, POLICY_IDS = every_policy(SCHEDULING_POLICIES, USER_POLICY, USER_ARGS)

TWO_TENANTS = {
    "num_requests": 150, "seed": 5,
    "arrival": {"kind": "poisson", "rate": 60.0},
    "prompt_len": {"kind": "uniform", "low": 5, "high": 150},
    "output_len": {"kind": "uniform", "low": 1, "high": 40},
    "tenants": [{"name": "batch", "share": 4, "priority": 1},
                {"name": "interactive", "share": 1, "priority": 0,
                 "prompt_len": {"kind": "uniform", "low": 5, "high": 40}}],
}


def _config(policy: str, args: dict | None, **scheduler: object) -> SimulationConfig:
    sched = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "policy": policy, "policy_args": args, **scheduler}
    return SimulationConfig.from_dict({"name": "t", "model": "smollm2-135m", "hardware": "a100-80gb-sxm",
                                       "sagellm": {"scheduler": sched, "kv_cache": {"num_blocks": 40}},
                                       "workload": TWO_TENANTS})


# ---- parity: the engine's loop and the simulator make identical decisions under every policy -----


@pytest.mark.parametrize("mode", ["hybrid", "time_share"])
@pytest.mark.parametrize("policy, args", EVERY_POLICY, ids=POLICY_IDS)
def test_engine_loop_and_simulator_make_identical_decisions(policy: str, args: dict | None, mode: str) -> None:
    config = _config(policy, args, mode=mode)
    engine_outs, engine_records = engine_loop_outputs(config, FixedFakeExecutor(0.004))
    sim_outs: list = []
    result = Simulation(config, cost_model=ConstantCostModel(0.004), on_step=lambda i, out: sim_outs.append(out)).run()
    assert sum(1 for o in engine_outs if o.preempted_ids) > 0, "the trace should force preemptions"
    assert [o.to_dict() for o in sim_outs] == [o.to_dict() for o in engine_outs]
    sim_records = sorted(result.records, key=lambda r: r.request_id)
    assert [(r.request_id, r.num_output_tokens, r.num_preemptions) for r in sim_records] == [
        (r.request_id, r.num_output_tokens, r.num_preemptions) for r in engine_records]
    for a, b in zip(sim_records, engine_records):
        assert a.ttft == pytest.approx(b.ttft, rel=1e-9, abs=1e-12)


def test_policies_really_decide_differently() -> None:
    """The parity test would hold trivially if every policy scheduled like FCFS: none does."""
    streams = {}
    for policy, args in EVERY_POLICY:
        outs: list = []
        Simulation(_config(policy, args), cost_model=ConstantCostModel(0.004),
                   on_step=lambda i, out, outs=outs: outs.append(out.request_ids)).run()
        streams[policy] = outs
    fcfs = streams.pop("fcfs")
    assert all(stream != fcfs for stream in streams.values()), [p for p, st in streams.items() if st == fcfs]


def test_the_steady_decode_fast_path_is_on_only_for_arrival_order() -> None:
    for policy, args in EVERY_POLICY:
        sim = Simulation(_config(policy, args), cost_model=ConstantCostModel(0.004))
        keeps_order = getattr(sim.replicas[0].scheduler.policy, "keeps_arrival_order", False)
        assert (sim.replicas[0].scheduler.steady is not None) == keeps_order, policy


# ---- no leaked or doubly owned block under any policy -----------------------------------------------

@pytest.mark.parametrize("policy, args", EVERY_POLICY, ids=POLICY_IDS)
def test_no_block_leaks_under_any_policy(policy: str, args: dict | None) -> None:
    @settings(max_examples=40, deadline=None)
    @given(actions=actions, num_blocks=st.integers(4, 20), block_size=st.sampled_from([1, 2, 4]),
           budget=st.integers(1, 48), seqs=st.integers(1, 6))
    def run(actions: list, num_blocks: int, block_size: int, budget: int, seqs: int) -> None:
        kv = KVCacheManager(num_blocks, block_size)
        s = Scheduler(kv, SchedulerLimits(seqs, budget, max_model_len=10_000),
                      policy=make_scheduling_policy(policy, args))
        run_actions(s, kv, actions, budget, seqs)

    run()


# ---- what each policy does ------------------------------------------------------------------------


def _req(rid: str, prompt: int, arrival: float, *, out: int = 4, tenant: str = "", priority: int = 0) -> Request:
    return Request(rid, list(range(1, prompt + 1)), SamplingParams(max_new_tokens=out, ignore_eos=True), arrival,
                   tenant=tenant, priority=priority)


def _admitted(policy: object, reqs: Sequence[Request], now: float = 10.0, seqs: int = 1) -> list[str]:
    """The ids the first step admits, with room for `seqs` requests."""
    s = Scheduler(KVCacheManager(64, 16), SchedulerLimits(seqs, 4096, max_model_len=1024), policy=policy)
    for r in reqs:
        s.add_request(r)
    return list(s.schedule(now).request_ids)


def test_priority_admits_the_lowest_value_then_the_earliest() -> None:
    reqs = [_req("late-urgent", 10, 2.0, priority=0), _req("early-lazy", 10, 0.0, priority=5),
            _req("early-urgent", 10, 1.0, priority=0)]
    assert _admitted(make_scheduling_policy("priority"), reqs, seqs=2) == ["early-urgent", "late-urgent"]
    assert _admitted(make_scheduling_policy("fcfs"), reqs, seqs=2) == ["late-urgent", "early-lazy"]


def test_priority_preempts_the_least_important_latest_request() -> None:
    policy = make_scheduling_policy("priority")
    running = [_req("a", 5, 0.0, priority=1), _req("b", 5, 1.0, priority=3), _req("c", 5, 2.0, priority=3)]
    assert policy.victim(running, 5.0).request_id == "c"


def test_sjf_takes_short_prompts_first_but_ages_long_ones() -> None:
    policy = make_scheduling_policy("sjf", {"max_wait_s": 30.0})
    reqs = [_req("long", 400, 0.0), _req("short", 10, 5.0), _req("mid", 100, 1.0)]
    assert [r.request_id for r in policy.order(reqs, now=10.0)] == ["short", "mid", "long"]
    assert [r.request_id for r in policy.order(reqs, now=30.5)] == ["long", "short", "mid"]


def test_srpt_oracle_orders_by_output_tokens_left() -> None:
    policy = make_scheduling_policy("srpt_oracle")
    reqs = [_req("many", 10, 0.0, out=500), _req("few", 10, 1.0, out=3), _req("some", 10, 2.0, out=50)]
    assert [r.request_id for r in policy.order(reqs, 3.0)] == ["few", "some", "many"]
    assert policy.victim(reqs, 3.0).request_id == "many"


def test_fair_shares_service_between_a_heavy_and_a_light_tenant() -> None:
    """Under saturation (400 requests within a second, four at a time), by the time the light
    tenant's last request is done the heavy tenant (4x the requests) has been served about as much
    with `fair`, and about 4x as much with `fcfs`."""
    def service(policy: str) -> dict[str, float]:
        workload = {**TWO_TENANTS, "num_requests": 400, "arrival": {"kind": "poisson", "rate": 400.0},
                    "tenants": [{"name": "heavy", "share": 4}, {"name": "light", "share": 1}],
                    "prompt_len": {"kind": "fixed", "value": 32}, "output_len": {"kind": "fixed", "value": 16}}
        cfg = SimulationConfig.from_dict({"name": "t", "model": "smollm2-135m", "hardware": "a100-80gb-sxm",
                                          "sagellm": {"scheduler": {"max_num_seqs": 4, "max_num_batched_tokens": 64,
                                                                    "policy": policy}},
                                          "workload": workload})
        sim = Simulation(cfg, cost_model=ConstantCostModel(0.01))
        tenants = {r.request_id: r.tenant for r in _trace(cfg)}
        result = sim.run()
        light_done = max(r.finish_time for r in result.records if tenants[r.request_id] == "light")
        done = [r for r in result.records if r.finish_time <= light_done]  # until the light tenant is served
        return {t: sum(1 for r in done if tenants[r.request_id] == t) for t in ("heavy", "light")}

    fcfs, fair = service("fcfs"), service("fair")
    assert fcfs["heavy"] > 3 * fcfs["light"]
    assert 0.8 < fair["heavy"] / fair["light"] < 1.3, fair


def _trace(cfg: SimulationConfig) -> list:
    from simulator.workloads import generate

    return list(generate(cfg.workload))


def test_fair_lifts_a_returning_tenant_to_the_least_active_counter() -> None:
    policy = make_scheduling_policy("fair")
    a, b = _req("a1", 10, 0.0, tenant="a"), _req("b1", 10, 0.0, tenant="b")
    policy.on_arrival(a, 0.0)
    policy.on_service(a, 10, 0)
    policy.on_arrival(b, 1.0)  # b was idle: it starts at a's counter, not at 0
    assert policy.counters["b"] == policy.counters["a"] == 10.0


# ---- bad policies are named clearly ----------------------------------------------------------------


def test_an_unknown_policy_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"scheduler\.policy: unknown scheduling policy 'edf'; registered: "
                                          r"\['fair', 'fcfs', 'priority', 'sjf', 'srpt_oracle'\]"):
        SageLLMConfig.from_dict({"scheduler": {"policy": "edf"}})


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_xyz:Policy", r"scheduler\.policy: cannot import module 'no_such_module_xyz'"),
    ("examples.policies.deadline:Nope", r"scheduler\.policy: module 'examples.policies.deadline' has no class 'Nope'"),
    ("sagellm.core.request:Request", r"scheduler\.policy: class .* is not a scheduling policy: it has no method "
                                     r"order, victim"),
])
def test_a_dotted_path_that_does_not_load_names_the_field(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SageLLMConfig.from_dict({"scheduler": {"policy": spec}})


def test_bad_policy_arguments_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"scheduler\.policy_args: 'sjf' cannot be built"):
        SageLLMConfig.from_dict({"scheduler": {"policy": "sjf", "policy_args": {"max_wait": 3}}})
    with pytest.raises(ConfigError, match=r"scheduler\.policy_args"):
        SageLLMConfig.from_dict({"scheduler": {"policy": "sjf", "policy_args": {"max_wait_s": -1}}})


class _Rogue:
    """Returns a request that is not waiting, or a victim that is not running."""

    def __init__(self, stranger: Request) -> None:
        self.stranger = stranger

    def order(self, waiting: Sequence[Request], now: float) -> list[Request]:
        return [self.stranger, *waiting]

    def victim(self, running: Sequence[Request], now: float) -> Request:
        return self.stranger


def test_a_policy_returning_a_request_that_is_not_waiting_is_caught() -> None:
    s = Scheduler(KVCacheManager(8, 4), SchedulerLimits(4, 64, max_model_len=32), policy=_Rogue(_req("x", 3, 0.0)))
    s.add_request(_req("a", 3, 0.0))
    with pytest.raises(PolicyError, match=r"scheduler\.policy: _Rogue\.order\(\) returned 'x', which is not a waiting"):
        s.schedule(1.0)
    assert [r.request_id for r in s.waiting] == ["a"] and not s.running and s.kv.num_free_blocks == 8


def test_a_policy_returning_a_victim_that_is_not_running_is_caught() -> None:
    class Victimless(_Rogue):
        def order(self, waiting: Sequence[Request], now: float) -> list[Request]:
            return list(waiting)

    s = Scheduler(KVCacheManager(2, 4), SchedulerLimits(4, 64, max_model_len=8),
                  policy=Victimless(_req("x", 3, 0.0)))
    for rid in ("a", "b"):
        s.add_request(_req(rid, 3, 0.0, out=5))
    out = s.schedule(1.0)
    s.update(out, StepResult(out.step_id, {x.request_id: 3 for x in out.scheduled if x.samples}), 1.0)
    with pytest.raises(PolicyError, match=r"victim\(\) returned 'x', which is not a running request"):
        for t in range(2, 10):
            out = s.schedule(float(t))
            s.update(out, StepResult(out.step_id, {x.request_id: 3 for x in out.scheduled if x.samples}), float(t))
