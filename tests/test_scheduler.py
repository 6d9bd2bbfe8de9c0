"""Scheduler behaviour: budgets, chunking, FCFS, preemption by recompute, stops, aborts."""

import pytest

from sagellm.core import KVCacheManager, Request, SamplingParams, Scheduler, SchedulerLimits, StepResult


def make(num_blocks=16, block_size=4, seqs=4, budget=16, max_len=64, chunked=True):
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(kv, SchedulerLimits(seqs, budget, max_len, chunked)), kv


def req(rid, n_prompt, max_new=4, **kw):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_new_tokens=max_new, **kw), 0.0,
                   eos_token_ids=(0,))


def step(s, token=7, now=0.0):
    out = s.schedule(now)
    res = StepResult(out.step_id, {x.request_id: token for x in out.scheduled if x.samples})
    return out, s.update(out, res, now)


def test_chunked_prefill_respects_budget_and_positions():
    s, kv = make(budget=5)
    s.add_request(req("a", 12))
    starts = []
    while True:
        out, fin = step(s)
        assert out.num_batched_tokens <= 5
        starts.append((out.scheduled[0].start_position, out.scheduled[0].num_tokens, out.scheduled[0].samples))
        if fin:
            break
    assert starts[:3] == [(0, 5, False), (5, 5, False), (10, 2, True)]
    assert starts[3:] == [(12, 1, True), (13, 1, True), (14, 1, True)]
    assert kv.num_free_blocks == kv.num_blocks


def test_running_requests_go_before_new_prompts_and_fcfs():
    s, _ = make(budget=8)
    s.add_request(req("a", 3, max_new=10))
    step(s)
    s.add_request(req("b", 20))
    s.add_request(req("c", 2))
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["a", "b"]
    assert out.scheduled[0].num_tokens == 1 and out.scheduled[1].num_tokens == 7
    # c waits behind b (first come, first served) until b's prompt is done
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["a", "b"]


def test_max_num_seqs_limits_running():
    s, _ = make(seqs=2, budget=64)
    for i in range(4):
        s.add_request(req(f"r{i}", 2))
    out, _ = step(s)
    assert len(out.scheduled) == 2


def test_preemption_by_recompute_when_blocks_run_out():
    s, kv = make(num_blocks=4, block_size=4, budget=16, max_len=16)
    s.add_request(req("a", 7, max_new=8))
    s.add_request(req("b", 7, max_new=8))
    preempted = []
    outputs = {"a": [], "b": []}
    for t in range(60):
        if not s.has_unfinished():
            break
        out = s.schedule(float(t))
        preempted += out.preempted_ids
        res = StepResult(out.step_id, {x.request_id: 5 for x in out.scheduled if x.samples})
        for x in out.scheduled:
            if x.samples:
                outputs[x.request_id].append(5)
        s.update(out, res, float(t))
        kv.check_invariants()
    assert preempted == ["b"]
    assert not s.has_unfinished()
    assert len(outputs["a"]) == 8 and len(outputs["b"]) == 8
    assert kv.num_free_blocks == 4


def test_resumed_request_recomputes_prompt_and_outputs():
    s, _ = make(num_blocks=4, block_size=4, budget=16, max_len=16)
    s.add_request(req("a", 7, max_new=8))
    s.add_request(req("b", 7, max_new=8))
    seen_resume = None
    for t in range(60):
        out = s.schedule(float(t))
        for x in out.scheduled:
            if x.request_id == "b" and x.resets_block_table and x.start_position == 0 and t > 0:
                seen_resume = x
        s.update(out, StepResult(out.step_id, {x.request_id: 5 for x in out.scheduled if x.samples}), 0.0)
        if not s.has_unfinished():
            break
    assert seen_resume is not None
    assert seen_resume.token_ids[:7] == tuple(range(1, 8))
    assert set(seen_resume.token_ids[7:]) <= {5}


def test_stop_on_eos_unless_ignored_and_stop_token_ids():
    s, _ = make()
    s.add_request(req("a", 3, max_new=10))
    s.add_request(req("b", 3, max_new=3, ignore_eos=True))
    s.add_request(req("c", 3, max_new=10, ignore_eos=True, stop_token_ids=(9,)))
    _, fin = step(s, token=0)
    assert {r.request_id for r in fin} == {"a"} and fin[0].finish_reason == "stop"
    _, fin = step(s, token=9)
    assert {r.request_id: r.finish_reason for r in fin} == {"c": "stop"}
    _, fin = step(s, token=0)
    assert {r.request_id: r.finish_reason for r in fin} == {"b": "length"}


def test_context_window_ends_generation_with_length():
    s, _ = make(max_len=8)
    s.add_request(req("a", 6, max_new=100))
    reasons = []
    for _ in range(10):
        _, fin = step(s)
        reasons += [r.finish_reason for r in fin]
        if fin:
            assert fin[0].num_tokens == 8
            break
    assert reasons == ["length"]


def test_prompt_longer_than_context_rejected():
    s, _ = make(max_len=8)
    with pytest.raises(ValueError, match="context window"):
        s.add_request(req("a", 8))


def test_abort_frees_blocks_and_is_reported_to_executor():
    s, kv = make()
    s.add_request(req("a", 6))
    step(s)
    assert kv.num_free_blocks < kv.num_blocks
    aborted = s.abort_request("a", 1.0)
    assert aborted.finish_reason == "abort"
    assert kv.num_free_blocks == kv.num_blocks
    out = s.schedule(2.0)
    assert out.finished_ids == ("a",)
    assert s.abort_request("a", 3.0) is None


def test_time_comes_from_arguments():
    s, _ = make()
    r = req("a", 2, max_new=2)
    s.add_request(r)
    step(s, now=10.0)
    step(s, now=12.5)
    assert r.first_scheduled_time == 10.0
    assert r.first_token_time == 10.0
    assert r.token_times == [10.0, 12.5]
    assert r.finish_time == 12.5
