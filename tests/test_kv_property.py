"""Property test: random add / abort / step sequences never leak or double-own a block."""

from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_actions import actions, run_actions

from sagellm.core import KVCacheManager, Request, SamplingParams, Scheduler, SchedulerLimits, StepResult
from sagellm.core.policies.eviction import EVICTION_POLICIES


@settings(max_examples=150, deadline=None)
@given(
    actions=actions,
    num_blocks=st.integers(4, 24),
    block_size=st.sampled_from([1, 2, 4, 16]),
    budget=st.integers(1, 64),
    seqs=st.integers(1, 8),
)
def test_every_block_free_or_owned_once(actions, num_blocks, block_size, budget, seqs):
    kv = KVCacheManager(num_blocks, block_size)
    run_actions(Scheduler(kv, SchedulerLimits(seqs, budget, max_model_len=10_000)), kv, actions, budget, seqs)


@settings(max_examples=120, deadline=None)
@given(
    actions=actions,
    num_blocks=st.integers(4, 24),
    block_size=st.sampled_from([1, 2, 4]),
    budget=st.integers(1, 64),
    seqs=st.integers(1, 8),
    ddr=st.integers(0, 8),
    nvme=st.integers(0, 8),
    granularity=st.sampled_from(["block", "request"]),
    eviction=st.sampled_from([*EVICTION_POLICIES.names(), "examples.policies.most_recent:MostRecentlyUsed"]),
    prefixes=st.integers(1, 3),
)
def test_prefix_caching_and_tiers_never_leak_or_misread(actions, num_blocks, block_size, budget, seqs, ddr, nvme,
                                                          granularity, eviction, prefixes):
    """The same random sequences with prefix caching, DDR/NVMe tiers and swapping on: every block
    and tier slot is accounted for after every step, and (checked by `ShadowKV`, which carries out
    the KV operations) every request reads exactly its own tokens."""
    import random

    from sagellm.core.kv import KVPolicy
    from tests.kv_shadow import ShadowKV

    if granularity == "request" and ddr == 0:
        ddr = 1
    policy = KVPolicy(enable_prefix_caching=True, granularity=granularity, ddr_blocks=ddr, nvme_blocks=nvme,
                      eviction_policy=eviction, cold_timeout_s=2.5, hot_access_threshold=2)
    kv = KVCacheManager(num_blocks, block_size, policy)
    s = Scheduler(kv, SchedulerLimits(seqs, budget, max_model_len=10_000))
    shadow = ShadowKV(num_blocks, block_size)
    rng = random.Random(0)
    added = []
    now = 0.0
    for kind, a, b, _ in actions:
        now += 1.0
        if kind == "add":
            rid = f"r{len(added)}"
            head = [1 + (len(added) % prefixes)] * 3  # a few shared prefixes
            prompt = (head + [1 + (i % 50) for i in range(a)])[: max(1, min(a, s.max_model_len - 1))]
            s.add_request(Request(rid, prompt, SamplingParams(max_new_tokens=b, ignore_eos=True), now))
            added.append(rid)
        elif kind == "abort" and added:
            s.abort_request(added[a % len(added)], now)
        elif kind == "step":
            out = s.schedule(now)
            shadow.step(out, s.requests, check_all=True)
            s.update(out, StepResult(out.step_id, {x: rng.randrange(1, 9) for x, smp in
                                                   zip(out.request_ids, out.samples) if smp}), now)
        kv.check_invariants()
    for _ in range(5000):
        if not s.has_unfinished():
            break
        now += 1.0
        out = s.schedule(now)
        shadow.step(out, s.requests, check_all=True)
        s.update(out, StepResult(out.step_id, {x: 3 for x, smp in zip(out.request_ids, out.samples) if smp}), now)
        kv.check_invariants()
    assert not s.has_unfinished() and not kv.owners()
    assert kv.num_free_blocks == num_blocks
