"""What prefix caching and KV tiers buy on multi-turn chats, live, side by side in one process.

Replays the multi-turn trace of `experiments/prefix_reuse.yaml` (open loop, at its arrival times)
on engines that differ only in their KV settings, alternating them round after round so that the
machine's drift hits all alike, and reports the median mean TTFT, the hit rate and the ratios:

- caching off vs on (a 1 GiB device pool, enough for everything);
- HBM only vs HBM + DDR + NVMe, with the 130-block device pool of `experiments/tiering.yaml`,
  too small for the conversations' working set.

    .venv/bin/python benchmarks/kv_gain.py --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from experiments.config import ExperimentConfig
from experiments.live import LiveRunner
from simulator.workloads import generate

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--num-requests", type=int, default=None, help="first N requests of the trace (default: all)")
    p.add_argument("--compare", choices=["caching", "tiers", "both"], default="both")
    args = p.parse_args()
    reuse = ExperimentConfig.from_yaml(ROOT / "experiments/prefix_reuse.yaml")
    tiering = ExperimentConfig.from_yaml(ROOT / "experiments/tiering.yaml")
    variants = {}
    if args.compare in ("caching", "both"):
        variants["caching off"] = (reuse.points[0].simulation, reuse)
        variants["caching on"] = (reuse.points[1].simulation, reuse)
    if args.compare in ("tiers", "both"):
        variants["hbm only"] = (tiering.points[0].simulation, tiering)
        variants["hbm+ddr+nvme"] = (tiering.points[1].simulation, tiering)
    runners, traces = {}, {}
    for name, (sim, _) in variants.items():
        runners[name] = LiveRunner(sim.sagellm)
        runners[name].warmup(4)
        traces[name] = list(generate(sim.workload, sim.base_dir))[: args.num_requests]
    results: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        for rep in range(args.repeats):
            for name, runner in runners.items():
                res = runner.run(traces[name], variants[name][0].slo.to_slo())
                s = res.summary
                results[name].append(s)
                print(f"round {rep}: {name:13s} TTFT mean {s['ttft_mean'] * 1e3:7.0f} ms"
                      f"  p90 {s['ttft_p90'] * 1e3:7.0f} ms  TPOT {s['tpot_mean'] * 1e3:6.1f} ms"
                      f"  hit rate {s['prefix_hit_rate']:.2f}  CPU stolen {res.info['cpu_steal']:.1%}", flush=True)
    finally:
        for runner in runners.values():
            runner.close()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"medians over {args.repeats} rounds:")
    for name in variants:
        ttft, hit = med(name, "ttft_mean") * 1e3, med(name, "prefix_hit_rate")
        print(f"  {name:13s} TTFT mean {ttft:7.0f} ms, hit rate {hit:.2f}")
    for base, other, label in (("caching off", "caching on", "caching on / off"),
                               ("hbm only", "hbm+ddr+nvme", "tiers / HBM only")):
        if base in results:
            ratios = [r1["ttft_mean"] / r0["ttft_mean"] for r0, r1 in zip(results[base], results[other])]
            print(f"mean TTFT, {label}: {statistics.median(ratios):.3f} (per round: "
                  + ", ".join(f"{x:.3f}" for x in ratios) + ")")


if __name__ == "__main__":
    main()
