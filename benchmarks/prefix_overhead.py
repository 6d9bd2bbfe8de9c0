"""What prefix caching costs when nothing is reused: offline throughput with caching off and on.

Two engines on the same SmolLM2-135M weights, one with `enable_prefix_caching`, run alternately in
one process on batches of distinct random prompts (a 0% hit rate: every lookup misses, every full
block is still hashed and registered). Reports each median output tokens/s and the ratio, in wall
time and in CPU time (this process's user + system seconds, all threads): on a VM that loses a
varying share of its CPU to the hypervisor, CPU time is the steadier measure of the work done.

    .venv/bin/python benchmarks/prefix_overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from sagellm.config import SageLLMConfig
from sagellm.engine import GenerateRequest, SageLLMEngine


def batch(n: int, prompt_len: int, new_tokens: int, vocab: int, seed: int) -> list[GenerateRequest]:
    rng = random.Random(seed)
    return [GenerateRequest(prompt_token_ids=tuple(rng.randrange(200, vocab) for _ in range(prompt_len)),
                            max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True, request_id=f"s{seed}-{i}")
            for i in range(n)]


def policy_cost(n: int, prompt_len: int, new_tokens: int, vocab: int, caching: bool,
                seed: int = 0) -> tuple[float, int]:
    """Seconds the policy layer alone (scheduler + KV manager, a fake executor) spends on the
    benchmark's workload, and its number of steps: the bookkeeping prefix caching adds, free of
    the model's noise."""
    from sagellm.core import KVCacheManager, Request, SamplingParams, Scheduler, SchedulerLimits, StepResult
    from sagellm.core.kv import KVPolicy

    kv = KVCacheManager(4096, 16, KVPolicy(enable_prefix_caching=caching))
    sched = Scheduler(kv, SchedulerLimits(64, 512, 2048))
    rng = random.Random(seed)
    for i in range(n):
        prompt = [rng.randrange(200, vocab) for _ in range(prompt_len)]
        sched.add_request(Request(f"r{i}", prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), 0.0))
    steps, t0 = 0, time.perf_counter()
    while sched.has_unfinished():
        out = sched.schedule(0.0)
        sched.update(out, StepResult(out.step_id, {r: 7 for r, smp in zip(out.request_ids, out.samples) if smp}), 0.0)
        steps += 1
    return time.perf_counter() - t0, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    costs = {caching: min(policy_cost(args.num_requests, args.prompt_len, args.new_tokens, 49152, caching)
                          for _ in range(5)) for caching in (False, True)}
    (off, steps), (on, _) = costs[False], costs[True]
    print(f"policy layer alone (best of 5): caching off {off * 1e3:.1f} ms, on {on * 1e3:.1f} ms for {steps} steps: "
          f"+{(on - off) / steps * 1e6:.0f} us per step")
    engines = {}
    for name, caching in (("caching off", False), ("caching on", True)):
        cfg = SageLLMConfig.from_dict({"kv_cache": {"enable_prefix_caching": caching},
                                       "backend": {"num_threads": args.threads}})
        engines[name] = SageLLMEngine(cfg).initialize()
    try:
        vocab = next(iter(engines.values())).shape.vocab_size
        rates: dict[str, list[float]] = {name: [] for name in engines}
        cpu_rates: dict[str, list[float]] = {name: [] for name in engines}
        seed = 0
        for rep in range(args.repeats + 1):  # the first round warms up
            for name, eng in engines.items():
                seed += 1  # fresh prompts every run: nothing to reuse
                reqs = batch(args.num_requests, args.prompt_len, args.new_tokens, vocab, seed)
                t0, c0 = time.perf_counter(), time.process_time()
                outs = eng.generate_batch(reqs)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                hits = eng.get_stats()["kv"]["hit_blocks"]
                tokens = sum(len(o.token_ids) for o in outs)
                if rep:
                    rates[name].append(tokens / dt)
                    cpu_rates[name].append(tokens / cpu)
                label = " (warm-up)" if not rep else ""
                print(f"round {rep}{label}: {name:12s} {tokens / dt:7.1f} tok/s wall ({dt:.2f} s), "
                      f"{tokens / cpu:7.1f} tok per CPU-s ({cpu:.2f} CPU-s), prefix hits so far {hits}", flush=True)
        for unit, r in (("tok/s wall", rates), ("tok per CPU-s", cpu_rates)):
            off, on = statistics.median(r["caching off"]), statistics.median(r["caching on"])
            print(f"median of {args.repeats}: caching off {off:.1f} {unit}, caching on {on:.1f} {unit}, "
                  f"on / off = {on / off:.3f}")
    finally:
        for eng in engines.values():
            eng.shutdown()


if __name__ == "__main__":
    main()
