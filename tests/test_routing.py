"""Routers as plug-ins: the same placements and decisions from the live cluster's loop and the
simulator for every registered router and a user's own (dotted path), what each router does, the
prefix index, and clear errors for a router that cannot be found, built or trusted."""

from __future__ import annotations

import pytest
from engine_loop import FixedFakeExecutor, cluster_loop_outputs
from registries import every_policy

from sagellm.config import ConfigError
from sagellm.core.policies import ROUTERS, ClusterView, PolicyError, make_router
from sagellm.core.policies.routing import ReplicaLoad, ReplicaState, RouteRequest
from sagellm.core.policies.routing.view import PrefixIndex
from simulator.config import SimulationConfig
from simulator.cost.base import ConstantCostModel
from simulator.sim import Simulation

USER_ROUTER = "examples.policies.tenant_home:TenantHome"
EVERY_ROUTER, ROUTER_IDS = every_policy(ROUTERS, USER_ROUTER, {"spill_at": 3})

CHATS = {
    "num_requests": 120, "seed": 3,
    "arrival": {"kind": "poisson", "rate": 40.0},
    "prompt_len": {"kind": "uniform", "low": 20, "high": 120},
    "output_len": {"kind": "uniform", "low": 1, "high": 24},
    "shared_prefix": {"num_groups": 6, "length": 48, "fraction": 0.9},
    "tenants": [{"name": "a", "share": 3}, {"name": "b", "share": 1}],
}


def _config(router: str, args: dict | None = None, replicas: int = 3, caching: bool = True,
            workload: dict | None = None) -> SimulationConfig:
    return SimulationConfig.from_dict({
        "name": "t", "model": "smollm2-135m", "hardware": "a100-80gb-sxm",
        "sagellm": {"scheduler": {"max_num_seqs": 6, "max_num_batched_tokens": 64},
                    "kv_cache": {"num_blocks": 48, "block_size": 4, "enable_prefix_caching": caching}},
        "cluster": {"num_replicas": replicas, "router": router, "router_args": args},
        "workload": workload or CHATS})


def _simulate(config: SimulationConfig, seconds: float = 0.004) -> tuple[list[list], dict[str, int], object]:
    outs: list[list] = [[] for _ in range(config.cluster.num_replicas)]
    result = Simulation(config, cost_model=ConstantCostModel(seconds),
                        on_step=lambda i, out: outs[i].append(out)).run()
    return outs, {r.request_id: r.replica for r in result.records}, result


# ---- parity: the cluster's loop and the simulator place and schedule identically -----------------


@pytest.mark.parametrize("router, args", EVERY_ROUTER, ids=ROUTER_IDS)
def test_cluster_loop_and_simulator_route_and_schedule_identically(router: str, args: dict | None) -> None:
    config = _config(router, args)
    live_outs, live_placed = cluster_loop_outputs(config, FixedFakeExecutor(0.004))
    sim_outs, sim_placed, _ = _simulate(config)
    assert sim_placed == live_placed
    assert len(set(live_placed.values())) > 1, "the trace should spread over the replicas"
    for live, sim in zip(live_outs, sim_outs):
        assert [o.to_dict() for o in sim] == [o.to_dict() for o in live]


def test_routers_really_place_differently() -> None:
    placements = {name: tuple(sorted(_simulate(_config(name, args))[1].items())) for name, args in EVERY_ROUTER}
    assert len(set(placements.values())) == len(placements)


def test_prefix_affinity_raises_the_hit_rate_over_least_outstanding() -> None:
    hit = {name: _simulate(_config(name))[2].summary["prefix_hit_rate"] for name in ("least_outstanding",
                                                                                 "prefix_affinity")}
    assert hit["prefix_affinity"] > hit["least_outstanding"] + 0.05


# ---- what each router does ------------------------------------------------------------------------

REQ = RouteRequest("r", num_prompt_tokens=64, num_prompt_blocks=4, max_new_tokens=8)


def _loads(*outstanding: int, cached: tuple[int, ...] = ()) -> list[ReplicaLoad]:
    cached = cached or (0,) * len(outstanding)
    return [ReplicaLoad(i, n, cached_blocks=c) for i, (n, c) in enumerate(zip(outstanding, cached))]


def test_round_robin_cycles_over_the_live_replicas() -> None:
    router = make_router("round_robin")
    assert [router.route(REQ, _loads(9, 0, 0), 0.0) for _ in range(4)] == [0, 1, 2, 0]
    assert router.route(REQ, [ReplicaLoad(0, 0), ReplicaLoad(2, 0)], 0.0) == 2


def test_least_outstanding_takes_the_emptiest_lowest_index_on_ties() -> None:
    assert make_router("least_outstanding").route(REQ, _loads(3, 1, 1), 0.0) == 1


def test_random_and_power_of_two_repeat_with_their_seed() -> None:
    for name in ("random", "power_of_two"):
        picks = [[make_router(name, {"seed": s}).route(REQ, _loads(0, 0, 0, 0), 0.0) for _ in range(1)]
                 for s in range(40)]
        again = [[make_router(name, {"seed": s}).route(REQ, _loads(0, 0, 0, 0), 0.0)] for s in range(40)]
        assert picks == again and len({p[0] for p in picks}) == 4


def test_power_of_two_never_picks_the_busiest_of_three() -> None:
    router = make_router("power_of_two", {"seed": 1})
    assert 0 not in {router.route(REQ, _loads(9, 1, 2), 0.0) for _ in range(100)}


def test_prefix_affinity_follows_the_cache_unless_the_cluster_is_out_of_balance() -> None:
    router = make_router("prefix_affinity", {"cache_threshold": 0.3, "balance_abs_threshold": 4,
                                             "balance_rel_threshold": 1.5})
    assert router.route(REQ, _loads(5, 1, cached=(2, 0)), 0.0) == 0        # 5 - 1 <= 4
    assert router.route(REQ, _loads(6, 1, cached=(2, 0)), 0.0) == 1        # 6 - 1 > 4 and 6 > 1.5 * 1
    assert router.route(REQ, _loads(16, 11, cached=(2, 0)), 0.0) == 0      # 16 <= 1.5 * 11
    assert router.route(REQ, _loads(2, 2, cached=(2, 3)), 0.0) == 1        # the longer prefix
    assert router.route(REQ, _loads(2, 1, cached=(1, 0)), 0.0) == 1        # 1 of 4 blocks: under 0.3
    assert router.route(REQ, _loads(4, 1, cached=(0, 0)), 0.0) == 1        # nothing cached
    short = RouteRequest("s", num_prompt_tokens=10, num_prompt_blocks=0, max_new_tokens=8)
    assert router.route(short, _loads(3, 1), 0.0) == 1                      # no full block to match
    assert make_router("prefix_affinity").route(REQ, _loads(60, 0, cached=(4, 0)), 0.0) == 0  # SGLang's 64
    # a new prefix goes where the router's index holds the least, as SGLang's smallest tree
    spread = [ReplicaLoad(0, 0, indexed_blocks=50), ReplicaLoad(1, 3, indexed_blocks=10),
              ReplicaLoad(2, 3, indexed_blocks=10)]
    assert router.route(REQ, spread, 0.0) == 1


def test_the_prefix_index_counts_leading_blocks_and_forgets_the_least_recent() -> None:
    index = PrefixIndex(capacity=4)
    index.record([1, 2, 3])
    assert index.leading_hits([1, 2, 9, 3]) == 2 and index.leading_hits([2, 3]) == 2
    index.record([7, 8])  # over capacity: block 1, the least recently routed, goes
    assert len(index) == 4 and index.leading_hits([1, 2]) == 0 and index.leading_hits([2, 3, 7]) == 3


def test_the_view_reports_cached_blocks_only_with_prefix_caching_and_state_routers() -> None:
    seen: list[list[ReplicaLoad]] = []

    class Spy:
        uses_replica_state = True

        def route(self, request, replicas, now):
            seen.append(list(replicas))
            return replicas[-1].index

    prompt = list(range(1, 20))  # 4 full blocks of 4
    for caching in (True, False):
        view = ClusterView(Spy(), 2, block_size=4, capacity_blocks=100, prefix_caching=caching)
        view.report(1, ReplicaState(queued_prompt_tokens=7, kv_usage=0.25))
        req = RouteRequest("r", 19, 4, 8)
        view.route(req, prompt, [0, 0], None, 0.0)
        view.route(req, prompt[:10], [0, 1], [True, True], 1.0)
        assert seen[-1][1] == ReplicaLoad(1, 1, 7, 0.25, 2 if caching else 0, 4 if caching else 0)


# ---- bad routers ------------------------------------------------------------------------------


def test_an_unknown_router_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"cluster.router: unknown routing policy 'fastest'.*prefix_affinity"):
        _config("fastest")


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_xyz:Router", "cannot import module 'no_such_module_xyz'"),
    ("examples.policies.tenant_home:Missing", "has no class 'Missing'"),
    ("examples.policies.deadline:EarliestDeadlineFirst", "it has no method route"),
])
def test_a_dotted_router_that_does_not_load_names_the_field(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=f"cluster.router: .*{match}"):
        _config(spec)


def test_bad_router_arguments_name_the_field() -> None:
    with pytest.raises(ConfigError, match="cluster.router_args: 'prefix_affinity' cannot be built"):
        _config("prefix_affinity", {"balance_rel_threshold": 0.5})
    with pytest.raises(ConfigError, match="cluster.router_args: expected a mapping"):
        _config("random", [1, 2])  # type: ignore[arg-type]


def test_a_router_returning_a_dead_or_unknown_replica_is_caught() -> None:
    class Stubborn:
        def route(self, request, replicas, now):
            return 0

    view = ClusterView(Stubborn(), 2, block_size=4, capacity_blocks=8)
    with pytest.raises(PolicyError, match=r"cluster.router: Stubborn.route returned 0, .*live: \[1\]"):
        view.route(REQ, list(range(16)), [0, 0], [False, True], 0.0)


# ---- the live cluster ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_live_cluster_keeps_a_shared_prefix_on_one_replica_with_prefix_affinity() -> None:
    from sagellm.config import SageLLMConfig
    from sagellm.engine import ClusterEngine, GenerateRequest

    cfg = SageLLMConfig.from_dict({"backend": {"num_threads": 1},
                                   "kv_cache": {"num_blocks": 256, "enable_prefix_caching": True},
                                   "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 128}})
    with pytest.raises(ConfigError, match="cluster.router: unknown routing policy"):
        ClusterEngine(cfg, num_replicas=2, router="fastest")
    groups = [tuple(1 + (i * 37 + g * 11) % 3000 for i in range(64)) for g in range(4)]
    with ClusterEngine(cfg, num_replicas=2, router="prefix_affinity") as eng:
        first = eng.generate_batch([GenerateRequest(prompt_token_ids=p + (5,), max_new_tokens=2, ignore_eos=True,
                                                    request_id=f"g{g}-0") for g, p in enumerate(groups)])
        follow = eng.generate_batch([GenerateRequest(prompt_token_ids=p + (7, k), max_new_tokens=2, ignore_eos=True,
                                                     request_id=f"g{g}-{k}")
                                     for g, p in enumerate(groups) for k in (1, 2)])
        text = eng.generate(GenerateRequest(prompt="a text prompt is placed by its bytes", max_new_tokens=2))
        stats, reports = eng.get_stats(), list(eng.view.num_reports)
    home = {o.request_id.split("-")[0]: o.record.replica for o in first}
    assert len(set(home.values())) == 2, "the first turns spread over both replicas"
    assert all(o.record.replica == home[o.request_id.split("-")[0]] for o in follow)
    assert all(o.finish_reason == "length" for o in first + follow + [text])
    assert stats["kv"]["hit_blocks"] >= 8 * 4  # each follower finds its group's 4 blocks
    assert all(n > 0 for n in reports)  # both workers reported their state after their steps
