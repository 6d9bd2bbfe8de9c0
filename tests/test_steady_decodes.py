"""Deferred steady decodes change how fast the scheduler runs, never what it decides.

Two schedulers, one plain and one with `deferred_decodes`, are driven side by side through the same
random arrivals, token draws, stop strings and aborts; every `SchedulerOutput` and every finished
request must be identical, and the block pool must balance at the end.
"""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagellm.core import KVCacheManager, Request, SamplingParams, Scheduler, SchedulerLimits, StepResult
from sagellm.core.kv.tiers import KVGranularity, KVPolicy
from sagellm.core.outputs import batch_totals
from sagellm.core.request import RequestStatus


def _pair(num_blocks, block_size, seqs, budget, max_len, max_decode, max_prefill, swap):
    made = []
    for deferred in (False, True):
        policy = KVPolicy(granularity=KVGranularity.REQUEST, ddr_blocks=num_blocks) if swap else None
        kv = KVCacheManager(num_blocks, block_size, policy) if policy else KVCacheManager(num_blocks, block_size)
        limits = SchedulerLimits(seqs, budget, max_len, True, max_prefill_batch=max_prefill,
                                 max_decode_batch=max_decode)
        made.append((Scheduler(kv, limits, deferred_decodes=deferred), kv))
    return made


def _request(i, rng, max_len, constant_tokens):
    n_prompt = rng.randint(1, max_len // 2)
    stop_ids = () if constant_tokens or rng.random() < 0.7 else (5,)
    sp = SamplingParams(max_new_tokens=rng.randint(1, max_len // 2), ignore_eos=rng.random() < 0.8,
                        stop_token_ids=stop_ids)
    return Request(f"r{i:03d}", [rng.randrange(1, 50) for _ in range(n_prompt)], sp, float(i), eos_token_ids=(3,))


def _snapshot(req: Request) -> tuple:
    return (req.request_id, req.status, tuple(req.output_token_ids), req.num_computed_tokens, tuple(req.token_times),
            req.first_token_time, req.finish_time, req.num_preemptions, req.stop_reason)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), num_blocks=st.integers(8, 40), block_size=st.sampled_from([1, 2, 4, 16]),
       seqs=st.integers(1, 12), budget=st.integers(4, 48), max_decode=st.sampled_from([None, 1, 3, 8]),
       max_prefill=st.sampled_from([None, 1, 2]), swap=st.booleans(), constant_tokens=st.booleans())
def test_deferred_decodes_make_the_plain_schedulers_decisions(seed, num_blocks, block_size, seqs, budget,
                                                              max_decode, max_prefill, swap, constant_tokens):
    rng = random.Random(seed)
    max_len = min(64, num_blocks * block_size)
    (plain, kv_plain), (deferred, kv_deferred) = _pair(num_blocks, block_size, seqs, budget, max_len,
                                                       max_decode, max_prefill, swap)
    assert deferred.steady is not None and plain.steady is None
    finished = {False: [], True: []}
    arrivals = 0
    for t in range(600):
        now = float(t)
        if arrivals < 40 and rng.random() < 0.5:
            r = _request(arrivals, rng, max_len, constant_tokens)
            for s in (plain, deferred):
                s.add_request(Request(r.request_id, list(r.prompt_token_ids), r.sampling, now,
                                      eos_token_ids=r.eos_token_ids))
            arrivals += 1
        if rng.random() < 0.03 and plain.requests:
            victim = rng.choice(sorted(plain.requests))
            a, b = plain.abort_request(victim, now), deferred.abort_request(victim, now)
            assert _snapshot(a) == _snapshot(b)
        out_p, out_d = plain.schedule(now), deferred.schedule(now)
        assert out_p.to_dict() == out_d.to_dict(), f"step {t}"
        # The deferred scheduler's own batch totals equal a count over the columns.
        columns_totals = batch_totals(out_d.start_positions, out_d.token_ids, out_d.samples)
        assert out_p.batch is None and out_d.batch == columns_totals, f"step {t}"
        samplers = [rid for rid, s in zip(out_p.request_ids, out_p.samples) if s]
        token = rng.randrange(1, 8)
        sampled = {rid: (token if constant_tokens else rng.randrange(1, 8)) for rid in samplers}
        stopped = tuple(rid for rid in samplers if rng.random() < 0.02)
        if rng.random() < 0.05 and plain.requests:  # a request aborted between schedule and update
            victim = rng.choice(sorted(plain.requests))
            a, b = plain.abort_request(victim, now), deferred.abort_request(victim, now)
            assert _snapshot(a) == _snapshot(b)
        for s, out in ((plain, out_p), (deferred, out_d)):
            done = s.update(out, StepResult(out.step_id, sampled, stopped, 1.0), now + 0.5)
            finished[s is deferred] += [_snapshot(r) for r in done]
        assert finished[False] == finished[True]
        assert len(plain.running) == len(deferred.running) and len(plain.waiting) == len(deferred.waiting)
        if rng.random() < 0.1:  # reading running state needs the sync; it must not change what follows
            deferred.sync_request_state()
            assert [_snapshot(r) for r in plain.running] == [_snapshot(r) for r in deferred.running]
        if arrivals >= 40 and not plain.requests:
            break
    deferred.sync_request_state()
    assert [_snapshot(r) for r in plain.requests.values()] == [_snapshot(r) for r in deferred.requests.values()]
    assert kv_plain.num_free_blocks == kv_deferred.num_free_blocks
    if not plain.requests:
        assert kv_deferred.num_free_blocks == kv_deferred.num_blocks
        assert not deferred._others and len(deferred.steady) == 0


def test_steady_decodes_are_deferred_and_written_back_exactly():
    limits = SchedulerLimits(8, 64, 256, True)
    s = Scheduler(KVCacheManager(64, 4), limits, deferred_decodes=True)
    s.add_request(Request("a", [1, 2, 3], SamplingParams(max_new_tokens=20, ignore_eos=True), 0.0))
    tokens = []
    for t in range(6):
        out = s.schedule(float(t))
        tokens.append(10 + t)
        s.update(out, StepResult(out.step_id, {"a": 10 + t}), float(t) + 0.5)
    req = s.requests["a"]
    assert "a" in s.steady and len(req.output_token_ids) < 6  # the decodes are deferred...
    s.sync_request_state()
    assert req.output_token_ids == tokens  # ...and written back exactly
    assert req.token_times == [t + 0.5 for t in range(6)] and req.num_computed_tokens == 3 + 5
    assert RequestStatus.RUNNING is req.status


def test_deferred_decodes_are_off_where_they_cannot_apply():
    kv = KVCacheManager(16, 4, KVPolicy(enable_prefix_caching=True))
    assert Scheduler(kv, SchedulerLimits(), deferred_decodes=True).steady is None
    assert Scheduler(KVCacheManager(16, 4), SchedulerLimits(time_share=True), deferred_decodes=True).steady is None
    assert Scheduler(KVCacheManager(16, 4), SchedulerLimits(), deferred_decodes=False).steady is None


def test_append_blocks_hands_out_what_one_at_a_time_would_and_is_all_or_nothing():
    one, bulk = KVCacheManager(6, 4), KVCacheManager(6, 4)
    for kv in (one, bulk):
        kv.allocate_slots("a", 4)
        kv.allocate_slots("b", 4)
    one.allocate_slots("b", 8)
    one.allocate_slots("a", 8)
    assert bulk.append_blocks(["b", "a"]) == [2, 3]
    assert bulk.block_table("a") == one.block_table("a") and bulk.block_table("b") == one.block_table("b")
    assert bulk.append_blocks(["a", "b", "a"]) is None  # 2 free, 3 asked: nothing changes
    assert bulk.num_free_blocks == 2 and bulk.block_table("a") == one.block_table("a")
    bulk.check_invariants()
