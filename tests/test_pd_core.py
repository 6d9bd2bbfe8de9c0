"""The policy layer's prefill/decode modes: HYBRID, TIME_SHARE, the two STRICT roles, the coordinator."""

from __future__ import annotations

import random

import pytest

from sagellm.core.kv.manager import KVCacheManager
from sagellm.core.kv.tiers import RECEIVE
from sagellm.core.outputs import SchedulerOutput, StepResult
from sagellm.core.pd import InferenceMode, NoWorkerError, PDCoordinator, ScheduleMode, resolve_modes
from sagellm.core.request import Request, RequestStatus
from sagellm.core.sampling import SamplingParams
from sagellm.core.scheduler import Scheduler, SchedulerLimits


def _scheduler(num_blocks: int = 256, **limits) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, 16), SchedulerLimits(**limits))


def _request(rid: str, prompt_len: int, out_len: int, arrival: float = 0.0) -> Request:
    return Request(rid, [1 + (i % 97) for i in range(prompt_len)],
                   SamplingParams(max_new_tokens=out_len, ignore_eos=True), arrival)


def _step(s: Scheduler, now: float, token: int = 7) -> tuple[SchedulerOutput, list[Request]]:
    out = s.schedule(now)
    res = StepResult(out.step_id, {rid: token for rid, smp in zip(out.request_ids, out.samples) if smp})
    return out, s.update(out, res, now + 0.01)


def _kinds(s: Scheduler, out: SchedulerOutput) -> list[str]:
    """'d' for a decode row, 'p' for a prefill row."""
    kinds = []
    for rid, start, toks in zip(out.request_ids, out.start_positions, out.token_ids):
        req = s.requests.get(rid)
        prompt = req.num_prompt_tokens if req is not None else None
        kinds.append("d" if len(toks) == 1 and prompt is not None and start >= prompt else "p")
    return kinds


def _random_run(s: Scheduler, seed: int, n: int = 60, steps: int = 3000):
    """Feed `n` random requests over time; yield (output, row kinds) per step until all finish."""
    rng = random.Random(seed)
    pending = [_request(f"r{i}", rng.randint(1, 120), rng.randint(1, 40)) for i in range(n)]
    for step in range(steps):
        if pending and rng.random() < 0.4:
            for _ in range(rng.randint(1, 4)):
                if pending:
                    s.add_request(pending.pop(0))
        if not s.has_unfinished():
            if not pending:
                return
            continue
        out = s.schedule(float(step))
        kinds = _kinds(s, out)
        res = StepResult(out.step_id, {rid: 5 for rid, smp in zip(out.request_ids, out.samples) if smp})
        s.update(out, res, step + 0.5)
        yield out, kinds
    raise AssertionError("requests did not finish")


def test_modes_resolve_and_name_the_field() -> None:
    assert resolve_modes("hybrid", "standard") == (ScheduleMode.HYBRID, InferenceMode.STANDARD)
    assert resolve_modes("hybrid", "pd_separate") == (ScheduleMode.STRICT, InferenceMode.PD_SEPARATE)
    assert resolve_modes("strict", "standard") == (ScheduleMode.STRICT, InferenceMode.PD_SEPARATE)
    with pytest.raises(ValueError, match="inference_mode"):
        resolve_modes("strict", "decode_only")
    with pytest.raises(ValueError, match="mode"):
        resolve_modes("both", "standard")


def test_hybrid_never_stalls_a_decode_and_respects_the_row_caps() -> None:
    s = _scheduler(max_num_seqs=16, max_num_batched_tokens=64, max_prefill_batch=2, max_decode_batch=16)
    mixed = 0
    for out, kinds in _random_run(s, seed=1):
        assert kinds.count("p") <= 2 and kinds.count("d") <= 16
        scheduled = set(out.request_ids)
        # Every running request whose prompt is done decodes in every step (budget 64 >= 16 seqs).
        for req in s.running:
            if req.request_id not in scheduled and req.num_output_tokens > 1:
                raise AssertionError(f"decode of {req.request_id} stalled in step {out.step_id}")
        mixed += "p" in kinds and "d" in kinds
    assert mixed > 10  # prefill chunks and decodes share steps


@pytest.mark.parametrize("decode_steps", [0, 3])
def test_time_share_steps_are_pure_and_follow_the_switching_policy(decode_steps: int) -> None:
    s = _scheduler(max_num_seqs=16, max_num_batched_tokens=64, time_share=True,
                   time_share_decode_steps=decode_steps)
    phases = []
    for _, kinds in _random_run(s, seed=2):
        assert len(set(kinds)) <= 1, f"a TIME_SHARE step mixed prefill and decode rows: {kinds}"
        phases.append(kinds[0] if kinds else "")
    assert "p" in phases and "d" in phases
    if decode_steps:
        # Between two prefill steps at least `decode_steps` decode steps ran, unless no request
        # could decode (all were still in prefill) - check the common case holds most of the time.
        gaps = [len(run) for run in "".join(phases).split("p") if run]
        assert sum(g >= decode_steps for g in gaps) >= 0.8 * len(gaps)


def test_prefill_only_role_hands_off_after_the_first_token() -> None:
    s = _scheduler(role=InferenceMode.PREFILL_ONLY, max_num_batched_tokens=64)
    s.add_request(_request("a", 40, 10))
    s.add_request(_request("b", 10, 1))  # one token: done on the prefill worker itself
    handed, finished = [], []
    for step in range(10):
        out, done = _step(s, float(step))
        handed += out.handoff_ids
        finished += done
        if not s.has_unfinished():
            break
    assert set(handed) == {"a", "b"}
    status = {r.request_id: r.status for r in finished}
    assert status == {"a": RequestStatus.FINISHED_PREFILLED, "b": RequestStatus.FINISHED_LENGTH}
    assert all(len(r.output_token_ids) == 1 for r in finished)
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_decode_only_role_receives_the_prompt_kv_then_decodes() -> None:
    s = _scheduler(role=InferenceMode.DECODE_ONLY, num_blocks=64)
    req = _request("a", 40, 5)
    req.output_token_ids.append(9)
    req.remote_kv_tokens = 40
    s.add_request(req)
    out, _ = _step(s, 0.0)
    assert out.request_ids == ("a",) and out.start_positions == (40,) and out.token_ids == ((9,),)
    receives = [op for op in out.kv_ops if op.kind == RECEIVE]
    assert [op.src_index for op in receives] == [0, 1, 2]  # 40 tokens in 3 blocks of 16
    assert [op.dst_index for op in receives] == list(out.new_block_ids[0][:3])
    for step in range(1, 10):
        _, done = _step(s, float(step))
        if done:
            assert done[0].output_token_ids == [9, 7, 7, 7, 7]
            break
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_decode_only_rejects_a_request_without_its_first_token() -> None:
    s = _scheduler(role=InferenceMode.DECODE_ONLY)
    req = _request("a", 40, 5)
    req.remote_kv_tokens = 40
    with pytest.raises(ValueError, match="first token"):
        s.add_request(req)


def test_coordinator_balances_fails_over_and_runs_out() -> None:
    c = PDCoordinator(2, 2)
    pairs = [c.assign(f"r{i}") for i in range(4)]
    assert pairs == [(0, 0), (1, 1), (0, 0), (1, 1)]
    c.complete("r0")
    assert c.assign("r4") == (0, 0)
    lost = c.fail_decode_worker(1)
    assert sorted(lost) == ["r1", "r3"]
    assert c.reassign("r1")[1] == 0 and c.assign("r5")[1] == 0
    c.fail_decode_worker(0)
    with pytest.raises(NoWorkerError, match="decode"):
        c.assign("r6")
