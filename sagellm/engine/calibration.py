"""Times the live engine's own executor on a grid of batch shapes (for the simulator's profiled model).

Each grid point is a list of (cached context, new tokens) chunks; a chunk of one token after a
non-empty context is a decode. A point becomes a real `SchedulerOutput` (fresh block tables over
the engine's KV pool, random token ids) and runs through `LiveExecutor.execute`: forward pass and
sampling, the same call the engine's loop makes. Rounds interleave the points so that slow phases
of a noisy machine spread over all of them; each point reports the median over its repeats.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from sagellm.core.outputs import SchedulerOutput
from sagellm.core.sampling import SamplingParams
from sagellm.graph import BatchShape

Chunks = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class CalibrationSample:
    """One grid point: its chunks, their `BatchShape`, and the measured step seconds."""

    label: str
    batch: BatchShape
    median_seconds: float
    min_seconds: float
    max_seconds: float
    repeats: int


def default_grid(max_tokens: int) -> list[Chunks]:
    """Prefill chunks, decode batches, mixed steps and multi-chunk prefills that fit `max_tokens`
    KV tokens in total (the pool) and 2048 tokens per request."""
    grid: list[Chunks] = []
    for n in (8, 32, 64, 128, 256, 512):
        for c in (0, 256, 1024):
            grid.append(((c, n),))
    for b in (1, 2, 4, 8, 16, 32, 48, 64):
        for c in (32, 256, 1024):
            grid.append(((c, 1),) * b)
    for n, c_pre in ((64, 0), (256, 0), (128, 512)):
        for b in (4, 16, 32):
            grid.append(((c_pre, n),) + ((256, 1),) * b)
    grid.append(((0, 128), (0, 128)))
    grid.append(((0, 64),) * 4)
    grid.append(((0, 256), (512, 128)))
    return [g for g in grid if sum(c + n for c, n in g) <= max_tokens and all(c + n <= 2048 for c, n in g)]


def describe(chunks: Chunks) -> str:
    decodes = [c for c, n in chunks if n == 1 and c > 0]
    prefills = [(c, n) for c, n in chunks if not (n == 1 and c > 0)]
    parts = [f"prefill {n}@{c}" for c, n in prefills]
    if decodes:
        parts.append(f"{len(decodes)} decodes@{round(statistics.mean(decodes))}")
    return " + ".join(parts)


def measure(engine, grid: list[Chunks], repeats: int = 5, warmup: int = 2, seed: int = 0,
            progress: Callable[[int, int], None] | None = None) -> list[CalibrationSample]:
    """Time every grid point on an initialized `SageLLMEngine` that is serving nothing.

    Side effects: writes garbage K/V into the engine's KV pool (no request is live) and registers
    then releases executor state under ids "calib-*".
    """
    executor = engine.executor
    block_size = engine.kv_manager.block_size
    num_blocks = engine.kv_manager.num_blocks
    rng = random.Random(seed)
    vocab = engine.shape.vocab_size
    outputs = [_output(chunks, block_size, num_blocks, rng, vocab) for chunks in grid]
    greedy = SamplingParams(max_new_tokens=1, temperature=0.0)
    ids = {rid for out in outputs for rid in out.request_ids}
    for rid in ids:
        executor.register(rid, greedy, stream=False)
    times: list[list[float]] = [[] for _ in grid]
    total = (warmup + repeats) * len(grid)
    done = 0
    try:
        for round_ in range(warmup + repeats):
            for i, out in enumerate(outputs):
                t0 = time.perf_counter()
                executor.execute(out)
                dt = time.perf_counter() - t0
                if round_ >= warmup:
                    times[i].append(dt)
                done += 1
                if progress is not None:
                    progress(done, total)
    finally:
        for rid in ids:
            executor.release(rid)
    return [
        CalibrationSample(describe(chunks), BatchShape.from_chunks(list(chunks)), statistics.median(t), min(t), max(t),
                          len(t))
        for chunks, t in zip(grid, times)
    ]


def _output(chunks: Chunks, block_size: int, num_blocks: int, rng: random.Random, vocab: int) -> SchedulerOutput:
    next_block = 0
    rows = []
    for k, (cached, n) in enumerate(chunks):
        nb = -(-(cached + n) // block_size)
        if next_block + nb > num_blocks:
            raise ValueError(f"grid point {describe(chunks)} needs more than the {num_blocks} KV blocks of the pool")
        blocks = tuple(range(next_block, next_block + nb))
        next_block += nb
        rows.append((f"calib-{k}", cached, tuple(rng.randrange(vocab) for _ in range(n)), blocks, True, True))
    cols = list(zip(*rows))
    return SchedulerOutput(0, *[tuple(c) for c in cols])
