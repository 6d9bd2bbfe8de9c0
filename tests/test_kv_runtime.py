"""The KV runtime's decisions in `sagellm.core`: prefix reuse, tiers, cold/hot migration, swapping.

Each test drives the real scheduler and KV manager and carries out their KV operations on
`ShadowKV`, which checks that every request reads exactly its own prefix's tokens.
"""

from __future__ import annotations

import random

import pytest

from sagellm.core import KVCacheManager, Request, SamplingParams, Scheduler, SchedulerLimits, StepResult
from sagellm.core.kv import KVPolicy
from tests.kv_shadow import ShadowKV, run_step

BS = 4


def make(num_blocks: int, policy: KVPolicy, seqs: int = 8, budget: int = 64) -> tuple[Scheduler, ShadowKV]:
    kv = KVCacheManager(num_blocks, BS, policy)
    return Scheduler(kv, SchedulerLimits(seqs, budget, max_model_len=10_000)), ShadowKV(num_blocks, BS)


def req(rid: str, prompt: list[int], new: int = 2, tenant: str = "", now: float = 0.0) -> Request:
    return Request(rid, prompt, SamplingParams(max_new_tokens=new, ignore_eos=True), now, tenant=tenant)


def drain(sched: Scheduler, shadow: ShadowKV, now: float = 0.0, step: float = 0.01, seed: int = 0) -> float:
    rng = random.Random(seed)
    while sched.has_unfinished():
        run_step(sched, shadow, now, rng)
        now += step
    return now


CACHING = KVPolicy(enable_prefix_caching=True)


def test_second_request_reuses_the_full_blocks_of_a_shared_prefix() -> None:
    sched, shadow = make(32, CACHING)
    prefix = list(range(1, 13))  # 3 full blocks
    sched.add_request(req("a", prefix + [20, 21]))
    drain(sched, shadow)
    sched.add_request(req("b", prefix + [30, 31, 32]))
    out = sched.schedule(1.0)
    assert out.start_positions == (12,) and len(out.new_block_ids[0]) == 4 and out.resets_block_table == (True,)
    stats = sched.kv.stats.to_dict()
    assert stats["hit_blocks_hbm"] == 3 and stats["hit_tokens"] == 12
    assert stats["query_blocks"] == 3 + 3  # a: 13 // 4 blocks could be reused, b: 14 // 4


def test_a_whole_prompt_hit_still_computes_its_last_token() -> None:
    sched, shadow = make(32, CACHING)
    prompt = list(range(1, 9))  # exactly 2 blocks
    sched.add_request(req("a", prompt))
    drain(sched, shadow)
    sched.add_request(req("b", prompt))
    out = sched.schedule(1.0)
    assert out.start_positions == (4,) and out.token_ids == ((5, 6, 7, 8),)


def test_tenant_isolation_keeps_tenants_apart() -> None:
    sched, shadow = make(32, KVPolicy(enable_prefix_caching=True, tenant_isolation=True))
    prompt = list(range(1, 14))
    sched.add_request(req("a", prompt, tenant="x"))
    drain(sched, shadow)
    sched.add_request(req("b", prompt, tenant="y"))
    sched.add_request(req("c", prompt, tenant="x"))
    out = sched.schedule(1.0)
    assert dict(zip(out.request_ids, out.start_positions)) == {"b": 0, "c": 12}


def test_evicted_blocks_move_down_the_tiers_and_come_back_as_loads() -> None:
    policy = KVPolicy(enable_prefix_caching=True, ddr_blocks=3, nvme_blocks=3, cold_timeout_s=None)
    sched, shadow = make(6, policy, seqs=1)
    prompts = {name: [100 * k + i for i in range(1, 14)] for k, name in enumerate("abc", 1)}  # 3 full blocks each
    now = 0.0
    for name, p in prompts.items():
        sched.add_request(req(name, p))
        now = drain(sched, shadow, now)
    stats = sched.kv.stats
    # c's blocks pushed a's out of the 6-block device pool to DDR, and b's DDR-bound blocks pushed a's to NVMe.
    assert stats.copies["offload:hbm->ddr"] >= 3 and stats.copies["offload:ddr->nvme"] >= 1
    sched.add_request(req("a2", prompts["a"] + [7]))
    out = sched.schedule(now)
    loads = [op for op in out.kv_ops if op.kind == "load"]
    assert out.start_positions == (12,) and len(loads) == 3 and {op.request_id for op in loads} == {"a2"}
    assert sum(sched.kv.stats.hit_blocks[t] for t in ("ddr", "nvme")) == 3
    shadow.step(out, sched.requests)  # a2 reads a's tokens back from the lower tiers


def test_without_lower_tiers_evicted_blocks_are_dropped() -> None:
    sched, shadow = make(6, CACHING, seqs=1)
    for k in range(3):
        sched.add_request(req(f"r{k}", [50 * k + i for i in range(1, 14)]))
        drain(sched, shadow)
    assert sched.kv.stats.drops["hbm"] >= 3 and not sched.kv.stats.copies


@pytest.mark.parametrize("policy_name", ["lru", "lfu"])
def test_eviction_policy_picks_the_victim(policy_name: str) -> None:
    policy = KVPolicy(enable_prefix_caching=True, eviction_policy=policy_name, ddr_blocks=4, cold_timeout_s=None)
    sched, shadow = make(4, policy, seqs=1)
    hot, cold = [1, 2, 3, 4, 5], [9, 9, 9, 9, 8]
    now = 0.0
    for k in range(3):  # the hot block is hit twice, then left alone longest
        sched.add_request(req(f"h{k}", hot))
        now = drain(sched, shadow, now)
    sched.add_request(req("cold", cold))
    now = drain(sched, shadow, now)
    sched.add_request(req("new", [7] * 11))  # 3 blocks: the 2 empty ones and one eviction
    drain(sched, shadow, now)
    kv = sched.kv
    tiers = {name: kv.lookup([sched_hash(tokens)])[0][0] for name, tokens in (("hot", hot), ("cold", cold))}
    assert tiers == ({"hot": "ddr", "cold": "hbm"} if policy_name == "lru" else {"hot": "hbm", "cold": "ddr"})


def sched_hash(tokens: list[int]) -> int:
    from sagellm.core.kv.hashing import ROOT_HASH, block_hash

    return block_hash(ROOT_HASH, tokens[:BS])


def test_cold_blocks_move_to_ddr_after_the_timeout_but_hot_ones_stay() -> None:
    policy = KVPolicy(enable_prefix_caching=True, ddr_blocks=8, cold_timeout_s=10.0, hot_access_threshold=2)
    sched, shadow = make(16, policy)
    hot, cold = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    now = 0.0
    for k in range(3):
        sched.add_request(req(f"h{k}", hot))
        now = drain(sched, shadow, now)
    sched.add_request(req("c", cold))
    now = drain(sched, shadow, now)
    assert sched.kv.stats.cold_offloads == 0
    sched.add_request(req("later", [40, 41]))
    drain(sched, shadow, now + 11.0)
    kv = sched.kv
    assert kv.lookup([sched_hash(hot)]) == [("hbm", kv.pool.cached[sched_hash(hot)])]
    assert kv.lookup([sched_hash(cold)])[0][0] == "ddr"
    assert kv.stats.cold_offloads == 1


def test_hot_blocks_in_nvme_are_promoted_to_free_ddr() -> None:
    policy = KVPolicy(enable_prefix_caching=True, ddr_blocks=1, nvme_blocks=4, cold_timeout_s=None,
                      hot_access_threshold=2)
    sched, shadow = make(2, policy, seqs=1)
    hot, x, y = [1, 2, 3, 4, 5], [11, 12, 13, 14, 15, 16, 17], [21, 22, 23, 24, 25, 26, 27]
    now = 0.0
    for k in range(3):
        sched.add_request(req(f"h{k}", hot, new=1))
        now = drain(sched, shadow, now)
    for name, prompt in (("x", x), ("y", y)):  # x pushes hot to DDR; y pushes x to DDR and hot to NVMe
        sched.add_request(req(name, prompt, new=1))
        now = drain(sched, shadow, now)
    kv = sched.kv
    assert kv.lookup([sched_hash(hot)])[0][0] == "nvme" and kv.ddr.num_free == 0
    sched.add_request(req("x2", x, new=1))  # loads x from DDR, which frees the slot ...
    now = drain(sched, shadow, now)
    sched.add_request(req("z", [31, 32], new=1))  # ... and the next step promotes the hot block
    drain(sched, shadow, now)
    assert kv.stats.copies["promote:nvme->ddr"] == 1 and kv.lookup([sched_hash(hot)])[0][0] == "ddr"


def test_request_granularity_swaps_a_preempted_request_instead_of_recomputing() -> None:
    policy = KVPolicy(granularity="request", ddr_blocks=16)
    sched, shadow = make(6, policy, seqs=4)
    for k in range(3):
        sched.add_request(req(f"r{k}", [10 * k + i for i in range(1, 7)], new=8))
    drain(sched, shadow)
    stats = sched.kv.stats
    assert sched.num_preemptions > 0 and stats.swaps_out == stats.swaps_in == sched.num_preemptions
    assert stats.copies["offload:hbm->ddr"] == stats.copies["load:ddr->hbm"] > 0


def test_a_failed_load_forgets_the_block_and_recomputes_the_request() -> None:
    policy = KVPolicy(enable_prefix_caching=True, ddr_blocks=4, cold_timeout_s=None)
    sched, shadow = make(4, policy, seqs=1)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    sched.add_request(req("a", a))
    drain(sched, shadow)
    sched.add_request(req("b", [50 + i for i in range(13)]))  # pushes a's blocks to DDR
    drain(sched, shadow, 1.0)
    sched.add_request(req("a2", a))
    out = sched.schedule(2.0)
    loads = [op for op in out.kv_ops if op.kind == "load"]
    assert loads and out.start_positions == (8,)
    bad = loads[0].dst_index
    sched.update(out, StepResult(out.step_id, {}, failed_blocks=(bad,), failed_request_ids=("a2",)), 2.1)
    sched.kv.check_invariants()
    assert bad not in sched.kv.pool.block_hash and sched.kv.stats.load_failures == 1
    out = sched.schedule(2.2)
    assert "a2" in out.preempted_ids and dict(zip(out.request_ids, out.start_positions))["a2"] == 0


@pytest.mark.parametrize("granularity", ["block", "request"])
def test_soak_5000_random_requests_with_aborts_leaves_every_tier_exact(granularity: str) -> None:
    """5,000 requests over shared prefixes with random lengths, arrivals and aborts, on small pools
    so that blocks keep moving between all three tiers; invariants after every step, and at the
    end nothing is owned, every lower-tier slot holds exactly the content its hash names."""
    policy = KVPolicy(enable_prefix_caching=True, granularity=granularity, ddr_blocks=24, nvme_blocks=24,
                      cold_timeout_s=0.5, hot_access_threshold=3)
    sched, shadow = make(40, policy, seqs=6, budget=24)
    rng = random.Random(granularity)
    prefixes = [[rng.randrange(1, 50) for _ in range(rng.randrange(4, 30))] for _ in range(12)]
    now, added, aborted = 0.0, 0, 0
    tokens_of: dict[int, list[int]] = {}
    while added < 5000 or sched.has_unfinished():
        if added < 5000:
            for _ in range(rng.randrange(0, 3)):
                prompt = rng.choice(prefixes) + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 12))]
                rid = f"r{added}"
                sched.add_request(req(rid, prompt, new=rng.randrange(1, 12), now=now))
                added += 1
        if sched.requests and rng.random() < 0.1:
            r = sched.abort_request(rng.choice(list(sched.requests)), now)
            for i, h in enumerate(r.block_hashes):
                tokens_of.setdefault(h, list(r.token_slice(i * BS, (i + 1) * BS)))
            aborted += 1
            sched.kv.check_invariants()
        _, finished = run_step(sched, shadow, now, rng)
        for r in [*sched.requests.values(), *finished]:  # what each content hash stands for
            for i, h in enumerate(r.block_hashes):
                tokens_of.setdefault(h, list(r.token_slice(i * BS, (i + 1) * BS)))
        now += rng.choice([0.01, 0.05, 0.3])
    kv = sched.kv
    kv.check_invariants()
    assert aborted > 300 and sched.num_preemptions > 0
    assert kv.pool.num_free == kv.num_blocks and not kv.owners()
    stats = kv.stats
    assert stats.hit_rate > 0.2 and stats.copies["load:ddr->hbm"] > 0 and stats.copies["load:nvme->hbm"] > 0
    assert stats.evictions["nvme"] > 0 and stats.drops["nvme"] > 0
    if granularity == "request":
        assert stats.swaps_out > 0
    # Every cached entry of a lower tier is held, in the shadow, by the slot the core says, with
    # the tokens its hash names; swapped copies died with their requests.
    for tier in kv.lower:
        assert tier.num_used == len(tier.slots)
        assert all(not isinstance(k, tuple) for k in tier.slots), "a swapped block outlived its request"
        for h, slot in tier.slots.items():
            assert tokens_of[h] == shadow.tiers[tier.tier][slot]
    for b, h in kv.pool.block_hash.items():
        assert tokens_of[h] == shadow.hbm[b]
