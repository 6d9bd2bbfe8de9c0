"""Prefill/decode modes on the live engine, across worker processes: the same greedy tokens in every
mode, measured KV hand-offs, and a decode worker that dies mid-run."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from sagellm.config import SageLLMConfig
from sagellm.engine import ClusterEngine, SageLLMEngine
from sagellm.engine.types import GenerateRequest

pytestmark = pytest.mark.slow

BASE = {"backend": {"num_threads": 1}, "kv_cache": {"num_blocks": 256},
        "scheduler": {"max_num_seqs": 16, "max_num_batched_tokens": 128}}
PROMPTS = [tuple(1 + (i * 31 + k * 7) % 4000 for i in range(20 + 23 * k)) for k in range(6)]


def _requests(tag: str, max_new_tokens: int = 10) -> list[GenerateRequest]:
    return [GenerateRequest(prompt_token_ids=p, max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True,
                            request_id=f"{tag}-{k}") for k, p in enumerate(PROMPTS)]


def _config(**sections: dict[str, Any]) -> SageLLMConfig:
    return SageLLMConfig.from_dict(BASE).replace(**sections)


@pytest.fixture(scope="module")
def reference() -> list[tuple[int, ...]]:
    """Greedy tokens from one in-process HYBRID engine."""
    with SageLLMEngine(_config()) as eng:
        return [o.token_ids for o in eng.generate_batch(_requests("ref"))]


@pytest.mark.parametrize("scheduler, kv_cache", [
    ({"mode": "time_share"}, {}),
    ({"mode": "time_share", "time_share_decode_steps": 4}, {}),
    ({"mode": "strict"}, {}),
    ({"mode": "strict"}, {"granularity": "layer"}),
    ({"mode": "strict", "prefill_workers": 2, "decode_workers": 1}, {"enable_prefix_caching": True}),
], ids=["time-share", "time-share-4", "strict-block", "strict-layer", "strict-2p1d-caching"])
def test_greedy_outputs_equal_hybrid(reference, scheduler: dict, kv_cache: dict) -> None:
    cfg = _config(scheduler=scheduler, kv_cache=kv_cache)
    with ClusterEngine(cfg) as eng:
        eng.start_step_log()
        outputs = eng.generate_batch(_requests("m"))
        steps = eng.take_step_log()
        assert [o.finish_reason for o in outputs] == ["length"] * len(PROMPTS), [o.error for o in outputs]
        assert [o.token_ids for o in outputs] == reference
        stats = eng.get_stats()
    # every worker's steps come back, tagged with the worker, in the order they ended
    assert [s.end_time for s in steps] == sorted(s.end_time for s in steps)
    assert {s.worker for s in steps} == set(range(len(stats["workers"])))
    for index, w in enumerate(stats["workers"]):
        assert sum(s.seconds for s in steps if s.worker == index) == pytest.approx(w["busy_s"], rel=1e-6)
    if cfg.scheduler.schedule_mode.value == "strict":
        n_prefill = cfg.scheduler.prefill_workers
        assert sum(s.batch.num_tokens for s in steps if s.worker < n_prefill) == sum(map(len, PROMPTS))
        assert sum(s.batch.num_tokens for s in steps if s.worker >= n_prefill) == 9 * len(PROMPTS)
    roles = [(w["schedule_mode"], w["role"]) for w in stats["workers"]]
    if cfg.scheduler.schedule_mode.value == "time_share":
        assert roles == [("time_share", "standard")]
    else:
        n_prefill = cfg.scheduler.prefill_workers
        assert roles == [("hybrid", "prefill_only")] * n_prefill + [("hybrid", "decode_only")]
    if cfg.scheduler.schedule_mode.value == "strict":
        # every request's KV was handed over once, and each hand-off was timed
        assert stats["handoff"]["count"] == len(PROMPTS) and stats["handoff"]["mean_s"] > 0
        for o in outputs:  # the record spans both workers: first token on the prefill worker
            assert o.metrics.ttft > 0 and len(o.metrics.inter_token_latencies) == 9
            assert o.record.num_output_tokens == 10 and o.record.first_token_time < o.record.finish_time
    # each record names the worker that finished the request (a decode worker in STRICT), as the simulator's do
    finishers = {s.worker for s in steps if s.batch.num_decodes}
    assert {o.record.replica for o in outputs} <= finishers
    if cfg.scheduler.schedule_mode.value == "strict":
        assert {o.record.replica for o in outputs} == {cfg.scheduler.prefill_workers}


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@pytest.mark.parametrize("retry", [False, True])
def test_a_dead_decode_worker_fails_or_retries_its_requests_and_the_cluster_keeps_serving(
        reference, retry: bool) -> None:
    cfg = _config(scheduler={"mode": "strict", "prefill_workers": 1, "decode_workers": 2,
                             "retry_on_worker_failure": retry})
    done: dict[str, Any] = {}
    with ClusterEngine(cfg) as eng:
        reqs = _requests("d", max_new_tokens=64)
        for r in reqs:
            eng._submit(r, lambda out: done.__setitem__(out.request_id, out))
        victims = [rid for rid, (_, d) in eng.coordinator.assigned.items() if d == 1]
        assert victims  # least-loaded routing spreads the six requests over both decode workers
        _wait_for(lambda: any(eng._tracked[v].stage == "decode" for v in victims if v in eng._tracked))
        dead = eng.workers[2]  # worker 0 prefills, 1 and 2 decode
        os.kill(dead.process.pid, signal.SIGKILL)
        _wait_for(lambda: len(done) == len(reqs), timeout=300.0)
        for r in reqs:
            out = done[r.request_id]
            if retry or r.request_id not in victims:
                assert out.finish_reason == "length", out.error
                assert len(out.token_ids) == 64
            else:
                assert out.finish_reason == "error"
                assert "worker 2 (decode_only" in out.error and "died" in out.error
        # the cluster still serves, on the surviving decode worker, with the same greedy tokens
        again = eng.generate_batch(_requests("after"))
        assert [o.token_ids for o in again] == reference
        assert eng.get_stats()["dead_workers"] == [2]


def test_handoff_calibration_fits_each_granularity_and_a_serving_factor() -> None:
    from sagellm.engine.pd_calibration import LINK_NAMES, measure_handoff_link

    links = measure_handoff_link(_config(), repeats=1, prompt_lengths=(16, 48, 96), serving_requests=3)
    assert set(links) == set(LINK_NAMES.values()) == {"hbm->peer", "hbm->peer_layer"}
    block, layer = links["hbm->peer"], links["hbm->peer_layer"]
    for link in (block, layer):
        assert link["bandwidth"] > 0 and link["latency"] >= 0 and link["serving_factor"] > 0
        assert link["samples"] == 3 and link["serving_samples"] == 3 and len(link["points"]) == 3
        assert link["cpu_steal"] is None or 0.0 <= link["cpu_steal"] <= 1.0
    # layer-wise, only one layer's share of the KV crosses after the step
    assert sum(x for x, _ in layer["points"]) < sum(x for x, _ in block["points"]) / 10


def test_in_situ_calibration_in_strict_mode_times_both_roles_under_their_own_labels() -> None:
    from simulator.commands import in_situ_samples, mode_of_label

    samples, meta = in_situ_samples(_config(), num_requests=5, runs=1, mode="strict")
    steps = [s for s in samples if s.label == "in situ@strict"]
    probes = [s for s in samples if s.label.startswith("probe@strict: ")]
    assert len(steps) + len(probes) == len(samples) and {mode_of_label(s.label) for s in samples} == {"strict"}
    assert meta["mode"] == "strict" and meta["replicas"] == 2 and meta["runs"] == 1
    assert probes and len(probes) % 4 == 0  # before and after, on both workers
    # a STRICT step is all prompt (the prefill worker's) or all decodes (the decode worker's)
    assert all(s.batch.num_decodes in (0, s.batch.num_seqs) for s in steps)
    assert any(s.batch.num_decodes == 0 for s in steps) and any(s.batch.num_decodes for s in steps)


def test_in_situ_calibration_on_a_cluster_times_the_steps_of_both_workers() -> None:
    from sagellm.engine.calibration import measure_in_situ, poisson_requests

    with ClusterEngine(_config(), num_replicas=2) as eng:
        samples = measure_in_situ(eng, num_requests=6, rate=20.0, seed=3)
        stats = eng.get_stats()
    timed = poisson_requests(6, 20.0, 3, eng.vocab_size, eng.max_model_len, "x")
    # each prompt token is computed once and each output token but the last is fed back once
    assert sum(s.batch.num_tokens for s in samples) == sum(
        len(r.prompt_token_ids) + r.max_new_tokens - 1 for _, r in timed)
    assert {s.label for s in samples} == {"in situ"}
    assert sum(s.median_seconds for s in samples) == pytest.approx(sum(w["busy_s"] for w in stats["workers"]),
                                                                   rel=1e-6)
    assert all(w["busy_s"] > 0 for w in stats["workers"])  # both replicas served
