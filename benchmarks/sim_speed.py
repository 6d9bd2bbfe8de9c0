"""How fast the simulator runs with the real scheduler in the loop.

The acceptance workload of the simulator issue: 100,000 requests on one replica, Poisson arrivals
at 6.45 req/s, prompt and output lengths drawn from the azure_conv trace, a Llama-2-7B-shaped model
in float16 on the A100-80GB roofline, chunked prefill with a 512-token budget and up to 512
sequences. Llama-2 has a 4,096-token context, so prompts are capped at 3,072 tokens (1.4% of
azure_conv prompts are longer) and outputs at 1,024 (none are longer).

    python benchmarks/sim_speed.py [--num-requests N] [--repeats R] [--profile] [--compare-plain]
                                   [--policy NAME] [--every-policy] [--count-bytecodes]
                                   [--against DIR [--pairs P]]

`--compare-plain` alternates each run with one whose schedulers run the plain per-request loop
(no deferred steady decodes): same decisions and results, and the ratio of the two speeds.
`--policy` runs another scheduling policy; `--every-policy` runs each registered policy in turn, with
the workload split between two tenants (4:1, the smaller one at priority 0), and prints each speed.
`--count-bytecodes` counts the Python bytecodes one run executes: the simulator's work, unmoved by
the machine's speed, for comparing two revisions on a noisy machine. `--against DIR` times this
checkout against another one (`git worktree add DIR REV`) in one process: P pairs of runs, the two
in alternating order, and prints each pair's speed ratio and their median (`--against .` gives the
noise floor: this checkout against a second copy of itself).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulator.config import SimulationConfig  # noqa: E402
from simulator.sim import Simulation  # noqa: E402

TRACE = ROOT / "data" / "traces" / "azure_conv.csv"


def config(num_requests: int, policy: str = "fcfs", tenants: bool = False) -> SimulationConfig:
    workload_tenants = {"tenants": [{"name": "heavy", "share": 4, "priority": 1},
                                    {"name": "light", "share": 1, "priority": 0}]} if tenants else {}
    return SimulationConfig.from_dict({
        "name": "sim-speed",
        "model": "llama-2-7b",
        "hardware": "a100-80gb-sxm",
        "sagellm": {
            "model": {"dtype": "float16", "max_model_len": 4096},
            "scheduler": {"max_num_seqs": 512, "max_num_batched_tokens": 512, "chunked_prefill": True,
                          "max_decode_batch": None, "policy": policy},
        },
        "workload": {
            "num_requests": num_requests,
            "seed": 0,
            "arrival": {"kind": "poisson", "rate": 6.45},
            "prompt_len": {"kind": "empirical", "path": str(TRACE), "column": "num_prefill_tokens"},
            "output_len": {"kind": "empirical", "path": str(TRACE), "column": "num_decode_tokens"},
            "max_prompt_len": 3072,
            "max_output_len": 1024,
            **workload_tenants,
        },
        "slo": {"ttft_ms": 2000, "tpot_ms": 200},
    })


def _sum_range_ms() -> float:
    """A yardstick of this machine's speed at the time of the run (docs quote it beside results)."""
    return min(timeit.repeat("sum(range(10**6))", number=5, repeat=5)) / 5 * 1e3


def every_policy(num_requests: int) -> None:
    from sagellm.core.policies import SCHEDULING_POLICIES

    for name in SCHEDULING_POLICIES.names():
        result = Simulation(config(num_requests, name, tenants=True)).run()
        s = result.summary
        print(f"{name:12s} {len(result.records) / result.wall_seconds:7.0f} simulated req per wall-second "
              f"({result.info['num_steps']} steps in {result.wall_seconds:.1f} s); mean TTFT "
              f"{s['ttft_mean'] * 1e3:.0f} ms, p90 {s['ttft_p90'] * 1e3:.0f} ms")
    print(f"machine speed: python -m timeit 'sum(range(10**6))' = {_sum_range_ms():.1f} ms here now")


_PACKAGES = ("sagellm", "simulator", "sim_speed")


def _loaded() -> dict:
    """The loaded modules of this project's packages (and of this benchmark)."""
    return {k: m for k, m in sys.modules.items() if k.split(".")[0] in _PACKAGES}


def _modules_of(root: Path) -> tuple[dict, object]:
    """Import the simulator and this benchmark's `config` from the checkout at `root` as fresh
    module objects: (those modules, its `config` function). `sys.modules` is left as it was."""
    import importlib

    mine = _loaded()
    for k in mine:
        del sys.modules[k]
    sys.path[:0] = [str(root), str(root / "benchmarks")]
    try:
        bench = importlib.import_module("sim_speed")
        importlib.import_module("simulator.sim")
        theirs = _loaded()
    finally:
        del sys.path[:2]
        _activate(mine)
    return theirs, bench.config


def _activate(modules: dict) -> None:
    """Make `modules` the ones imports resolve to (a run imports some modules lazily)."""
    for k in _loaded():
        del sys.modules[k]
    sys.modules.update(modules)


def against(other: Path, num_requests: int, pairs: int) -> None:
    """Alternate runs of this checkout and the one at `other`, in one process; print the ratios."""
    import gc

    sides = [_modules_of(ROOT), _modules_of(other.resolve())]
    mine_now = _loaded()
    ratios = []
    for p in range(pairs):
        rates = [0.0, 0.0]
        for side in ((0, 1) if p % 2 == 0 else (1, 0)):
            modules, make_config = sides[side]
            _activate(modules)
            result = modules["simulator.sim"].Simulation(make_config(num_requests)).run()
            rates[side] = len(result.records) / result.wall_seconds
            del result
            gc.collect()
        ratios.append(rates[0] / rates[1])
        print(f"pair {p + 1}: this checkout {rates[0]:.0f}, {other} {rates[1]:.0f} simulated req per wall-second, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    _activate(mine_now)
    print(f"this checkout / {other}: median {statistics.median(ratios):.3f} over {pairs} pairs "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); {num_requests} requests per run")


def count_bytecodes(cfg: SimulationConfig) -> int:
    """Python bytecodes executed by one run of `cfg` (`sys.settrace` opcode events): a measure of the
    simulator's work that, unlike wall time, does not move with this machine's speed. About 50x
    slower than a plain run; compare two revisions with the same --num-requests."""
    import numpy  # noqa: F401  (imported before tracing: the run imports it lazily)

    sim = Simulation(cfg)
    count = 0

    def trace(frame, event, arg):  # noqa: ANN001, ANN202  (the sys.settrace signature)
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        sim.run()
    finally:
        sys.settrace(None)
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="cProfile one run and print the top functions")
    ap.add_argument("--compare-plain", action="store_true",
                    help="alternate with runs of the plain scheduler loop and print the speed ratio")
    ap.add_argument("--policy", default="fcfs", help="scheduling policy (a registered name or package.module:Class)")
    ap.add_argument("--every-policy", action="store_true",
                    help="one run of each registered policy on a two-tenant split of the workload")
    ap.add_argument("--count-bytecodes", action="store_true",
                    help="count the Python bytecodes one run executes (use a few thousand requests)")
    ap.add_argument("--against", type=Path, metavar="DIR",
                    help="time this checkout against the checkout in DIR, alternating in one process")
    ap.add_argument("--pairs", type=int, default=12, help="pairs of runs with --against")
    args = ap.parse_args()
    if args.against is not None:
        against(args.against, args.num_requests, args.pairs)
        return
    if args.every_policy:
        every_policy(args.num_requests)
        return
    cfg = config(args.num_requests, args.policy)
    if args.count_bytecodes:
        print(f"{count_bytecodes(cfg)} Python bytecodes executed by one run of {args.num_requests} requests")
        return
    if args.profile:
        sim = Simulation(cfg)
        cProfile.runctx("sim.run()", globals(), {"sim": sim}, "/tmp/sim_speed.prof")
        pstats.Stats("/tmp/sim_speed.prof").sort_stats("tottime").print_stats(15)
        return
    rates, step_rates, plain_rates = [], [], []
    for k in range(args.repeats):
        result = Simulation(cfg).run()
        wall = result.wall_seconds
        info = result.info
        rates.append(len(result.records) / wall)
        step_rates.append(info["num_steps"] / wall)
        print(f"run {k + 1}: {len(result.records)} requests, {info['num_steps']} steps, "
              f"{info['simulated_seconds']:.0f} simulated s in {wall:.1f} wall s -> "
              f"{rates[-1]:.0f} req/s, {step_rates[-1]:.0f} steps/s")
        if args.compare_plain:
            plain = Simulation(cfg, deferred_decodes=False).run()
            if plain.summary != result.summary or plain.info["num_steps"] != info["num_steps"]:
                raise SystemExit("the plain scheduler loop made different decisions: this is a bug")
            plain_rates.append(len(plain.records) / plain.wall_seconds)
            print(f"run {k + 1}, plain loop: same {info['num_steps']} steps and results in "
                  f"{plain.wall_seconds:.1f} wall s -> {plain_rates[-1]:.0f} req/s")
    s = result.summary
    print(f"simulated: throughput {s['request_throughput']:.2f} req/s, mean TTFT {s['ttft_mean'] * 1e3:.0f} ms, "
          f"mean TPOT {s['tpot_mean'] * 1e3:.1f} ms, preemptions {s['num_preemptions']:.0f}, "
          f"KV blocks {info['num_kv_blocks_per_replica']}")
    print(f"median over {args.repeats} runs: {statistics.median(rates):.0f} simulated requests per wall-second, "
          f"{statistics.median(step_rates):.0f} scheduler steps per second (target >= 3000 req/s)")
    if plain_rates:
        ratios = [a / b for a, b in zip(rates, plain_rates)]
        print(f"plain loop: median {statistics.median(plain_rates):.0f} req/s; deferred / plain per pair: "
              + ", ".join(f"{r:.2f}x" for r in ratios) + f" (median {statistics.median(ratios):.2f}x)")
    print(f"machine speed: python -m timeit 'sum(range(10**6))' = {_sum_range_ms():.1f} ms here now")


if __name__ == "__main__":
    main()
