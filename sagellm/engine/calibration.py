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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    """Prefill chunks, decode batches (every size up to 16, then sparser), mixed steps and
    multi-chunk prefills that fit `max_tokens` KV tokens in total (the pool) and 2048 tokens per
    request."""
    grid: list[Chunks] = []
    for n in (8, 16, 32, 64, 128, 256, 384, 512):
        for c in (0, 256, 1024):
            grid.append(((c, n),))
    for b in (*range(1, 17), 24, 32, 48, 64):
        for c in (32, 256, 1024):
            grid.append(((c, 1),) * b)
    for n, c_pre in ((32, 0), (128, 0), (256, 0), (128, 512)):
        for b in (2, 4, 8, 16, 32):
            grid.append(((c_pre, n),) + ((256, 1),) * b)
    grid.append(((0, 128), (0, 128)))
    grid.append(((0, 64),) * 4)
    grid.append(((0, 256), (512, 128)))
    return [g for g in grid if sum(c + n for c, n in g) <= max_tokens and all(c + n <= 2048 for c, n in g)]


# A few representative steps (a prefill chunk, decode batches, a mixed step), timed before and after
# live runs to measure how fast the machine is right now relative to its calibrated profile.
# They fit a pool of 72 blocks of 16 tokens (smaller pools probe with the shapes that fit).
PROBE_GRID: list[Chunks] = [((0, 256),), ((240, 1),) * 4, ((80, 1),) * 12, ((0, 128),) + ((112, 1),) * 6]


def speed_probe(engine, repeats: int = 5) -> list[CalibrationSample]:
    """Time `PROBE_GRID` on an idle engine (same method and side effects as `measure`)."""
    bs, blocks = engine.kv_manager.block_size, engine.kv_manager.num_blocks
    grid = [g for g in PROBE_GRID if sum(-(-(c + n) // bs) for c, n in g) <= blocks]
    if not grid:
        raise ValueError(f"the speed probe needs a KV pool of at least 17 blocks of 16 tokens, not {blocks}")
    return measure(engine, grid, repeats=repeats, warmup=1, seed=1)


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

    The steps run on a worker thread, as the engine's own loop does (a step measured from the
    main thread was 2-5% faster here), over block ids scattered through the pool as a busy pool's
    are. Side effects: writes garbage K/V into the engine's KV pool (no request is live) and
    registers then releases executor state under ids "calib-*".
    """
    result: list[CalibrationSample] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            result.extend(_measure(engine, grid, repeats, warmup, seed, progress))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    worker = threading.Thread(target=work, name="sagellm-calibration")
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result


def _measure(engine, grid: list[Chunks], repeats: int, warmup: int, seed: int,
             progress: Callable[[int, int], None] | None) -> list[CalibrationSample]:
    executor = engine.executor
    block_size = engine.kv_manager.block_size
    num_blocks = engine.kv_manager.num_blocks
    rng = random.Random(seed)
    vocab = engine.shape.vocab_size
    order = list(range(num_blocks))
    rng.shuffle(order)
    outputs = [_output(chunks, block_size, order, rng, vocab) for chunks in grid]
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


def _output(chunks: Chunks, block_size: int, block_order: list[int], rng: random.Random, vocab: int
            ) -> SchedulerOutput:
    next_block = 0
    rows = []
    for k, (cached, n) in enumerate(chunks):
        nb = -(-(cached + n) // block_size)
        if next_block + nb > len(block_order):
            raise ValueError(f"grid point {describe(chunks)} needs more than the {len(block_order)} KV blocks "
                             "of the pool")
        blocks = tuple(block_order[next_block:next_block + nb])
        next_block += nb
        rows.append((f"calib-{k}", cached, tuple(rng.randrange(vocab) for _ in range(n)), blocks, True, True))
    cols = list(zip(*rows))
    return SchedulerOutput(0, *[tuple(c) for c in cols])


def poisson_requests(num_requests: int, rate: float, seed: int, vocab_size: int, max_model_len: int,
                     id_prefix: str) -> list[tuple[float, Any]]:
    """The calibrations' serving workload: (arrival s, `GenerateRequest`) with Poisson arrivals at
    `rate`, random prompts of 16-640 tokens (capped to fit `max_model_len`) and 8-96 output tokens,
    greedy with `ignore_eos`; ids `<id_prefix>-<k>`."""
    from sagellm.engine.types import GenerateRequest

    rng = random.Random(seed)
    timed, t = [], 0.0
    for k in range(num_requests):
        t += rng.expovariate(rate)
        out_len = rng.randint(8, 96)
        prompt_len = max(1, min(rng.randint(16, 640), max_model_len - out_len - 1))
        ids = tuple(rng.randrange(vocab_size) for _ in range(prompt_len))
        timed.append((t, GenerateRequest(prompt_token_ids=ids, request_id=f"{id_prefix}-{k}", max_new_tokens=out_len,
                                         temperature=0.0, ignore_eos=True)))
    return timed


def measure_in_situ(engine, num_requests: int = 48, rate: float = 1.2, seed: int = 0) -> list[CalibrationSample]:
    """Serve a short Poisson workload with the engine's own loop and record every step's batch and
    executor time (one sample per step, label "in situ").

    Grid samples time each shape in isolation; these are the steps of real serving, with the
    scheduler, the asyncio front end and the other requests' state around them. `engine` is a
    `SageLLMEngine` or a `ClusterEngine` (then the steps of every worker, which compete for the
    machine's cores as they do when a cluster serves). Side effects: runs the requests through the
    engine (ids "calib-live-*") with its step log on.
    """
    from sagellm.engine.replay import replay

    timed = poisson_requests(num_requests, rate, seed, engine.vocab_size, engine.max_model_len, "calib-live")
    engine.start_step_log()
    try:
        replay(engine, timed)
    finally:
        log = engine.take_step_log()
    return [CalibrationSample("in situ", s.batch, s.seconds, s.seconds, s.seconds, 1) for s in log if s.batch.num_seqs]
