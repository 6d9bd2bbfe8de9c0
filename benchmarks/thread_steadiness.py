"""How fast, and how steady, serving steps are on one torch thread against two, side by side.

Times a few fixed steps (decode batches and a prompt chunk, over block ids scattered through the
pool, as `sagellm calibrate` does) in alternating blocks of `--block-s` seconds: two threads, then
one, then two... for `--minutes`. Each block gives one median per step. For each thread count it
reports the mean block median and how much the block medians move: their coefficient of variation
and the mean change from one block of that thread count to the next. Both thread counts see the
same machine, interleaved, so the comparison is fair to the VM's own drift.

    .venv/bin/python benchmarks/thread_steadiness.py --minutes 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sagellm import SageLLMConfig
from sagellm.engine import SageLLMEngine
from sagellm.engine.calibration import Chunks, describe, measure

STEPS: list[Chunks] = [((100, 1),) * 2, ((150, 1),) * 5, ((200, 1),) * 16, ((0, 128),)]


def run(minutes: float, block_s: float, threads: tuple[int, ...]) -> dict[int, list[list[float]]]:
    """Block medians (seconds, one list per step) for each thread count, in time order."""
    engine = SageLLMEngine(SageLLMConfig().replace(model={"dtype": "float32"})).initialize()
    blocks: dict[int, list[list[float]]] = {t: [] for t in threads}
    try:
        measure(engine, STEPS, repeats=2, warmup=2)
        end = time.monotonic() + minutes * 60
        i = 0
        while time.monotonic() < end:
            n = threads[i % len(threads)]
            torch.set_num_threads(n)
            start, rounds = time.monotonic(), []
            while time.monotonic() - start < block_s:
                rounds.append([s.median_seconds for s in measure(engine, STEPS, repeats=3, warmup=0)])
            blocks[n].append([statistics.median(r[k] for r in rounds) for k in range(len(STEPS))])
            i += 1
    finally:
        engine.shutdown()
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--block-s", type=float, default=12.0)
    args = parser.parse_args()
    blocks = run(args.minutes, args.block_s, (2, 1))
    print(f"{args.minutes:g} min in blocks of {args.block_s:g} s, alternating 2 and 1 torch threads")
    print("| step | threads | blocks | mean block median ms | CV of block medians | mean change block to block |")
    print("|---|---|---|---|---|---|")
    for k, chunks in enumerate(STEPS):
        for n, rows in blocks.items():
            xs = [r[k] for r in rows]
            if len(xs) < 2:
                continue
            mean = statistics.fmean(xs)
            change = statistics.fmean(abs(b - a) for a, b in zip(xs, xs[1:])) / mean
            print(f"| {describe(chunks)} | {n} | {len(xs)} | {mean * 1e3:.1f} | {statistics.pstdev(xs) / mean:.1%} "
                  f"| {change:.1%} |")


if __name__ == "__main__":
    main()
