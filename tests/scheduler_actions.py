"""Random add / abort / step sequences against a scheduler, with the block invariants checked after
every action: the shared body of the block-leak property tests."""

from __future__ import annotations

from hypothesis import strategies as st

from sagellm.core import KVCacheManager, Request, SamplingParams, Scheduler, StepResult

TENANTS = ("batch", "interactive", "other")

# (kind, a, b, c): add a prompt of a tokens, b new tokens max, tenant and priority c; abort the
# a-th added request; step, with every sampled token an EOS when a == 0.
actions = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12), st.integers(0, 2)),
    st.tuples(st.just("abort"), st.integers(0, 30), st.just(0), st.just(0)),
    st.tuples(st.just("step"), st.integers(0, 3), st.just(0), st.just(0)),
), min_size=1, max_size=80)


def run_actions(s: Scheduler, kv: KVCacheManager, actions: list, budget: int, seqs: int) -> None:
    """Apply `actions`, checking after each that every block is free or owned once, and only by a
    running request; then drain: every request finishes and every block comes back."""
    added: list[str] = []
    now = 0.0
    for kind, a, b, c in actions:
        now += 1.0
        if kind == "add":
            rid = f"r{len(added)}"
            prompt = [1 + (i % 50) for i in range(min(a, s.max_model_len - 1))]
            s.add_request(Request(rid, prompt, SamplingParams(max_new_tokens=b), now, eos_token_ids=(0,),
                                  tenant=TENANTS[c], priority=c))
            added.append(rid)
        elif kind == "abort" and added:
            s.abort_request(added[a % len(added)], now)
        elif kind == "step":
            out = s.schedule(now)
            assert out.num_batched_tokens <= budget and len(out.scheduled) <= seqs
            # eos (token 0) every few steps exercises early stops
            s.update(out, StepResult(out.step_id, {x.request_id: (0 if a == 0 else 3)
                                                   for x in out.scheduled if x.samples}), now)
        kv.check_invariants()
        # only running requests own blocks; waiting (and preempted) ones own none
        assert set(kv.owners()) <= {r.request_id for r in s.running}
    for _ in range(5000):
        if not s.has_unfinished():
            break
        now += 1.0
        out = s.schedule(now)
        s.update(out, StepResult(out.step_id, {x.request_id: 3 for x in out.scheduled if x.samples}), now)
        kv.check_invariants()
    assert not s.has_unfinished() and kv.num_free_blocks == kv.num_blocks
