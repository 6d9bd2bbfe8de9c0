"""A speed probe that runs beside live serving on idle CPU time only, so it can tell how fast this
machine is *during* a run.

On a shared VM the speed of a step drifts by 5-10% from one 15-second window to the next (other
VMs' memory traffic, the host's clocks), with no CPU steal to show for it; a probe timed before or
after a run does not see the speed during it. `IdleSpeedProbe` runs a fixed memory-bound kernel
(a float32 matrix-vector product over a matrix larger than the caches, like a decode step's
linear layers) in a child process under the `SCHED_IDLE` policy: the kernel runs only when no
other task wants a core and yields a core as soon as one does, and a timing is kept only when the
kernel was not preempted (wall time within a margin of its CPU time).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import statistics
import threading
import time
from dataclasses import dataclass

MATRIX_ROWS = 4096  # 4096 x 4096 float32: 64 MiB, past any cache here
SEND_EVERY_S = 0.5
PREEMPTION_MARGIN_S = 100e-6
STOP_WAIT_S = 10.0


@dataclass(frozen=True)
class ProbeSample:
    """One uninterrupted kernel: when it ended (`time.monotonic`) and how long it took."""

    end_time: float
    seconds: float


def _probe_loop(rows: int, samples: mp.Queue, stop: mp.Event, parent_pid: int) -> None:  # runs in the child
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    import torch

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(rows, rows, generator=gen)
    vector = torch.randn(rows, generator=gen)
    out = torch.empty(rows)
    batch: list[tuple[float, float]] = []
    last_send = time.monotonic()
    while not stop.is_set() and os.getppid() == parent_pid:  # also ends when the parent is gone
        c0, t0 = time.thread_time(), time.monotonic()
        torch.mv(matrix, vector, out=out)
        t1, c1 = time.monotonic(), time.thread_time()
        if (t1 - t0) - (c1 - c0) <= PREEMPTION_MARGIN_S:
            batch.append((t1, t1 - t0))
        if t1 - last_send >= SEND_EVERY_S:
            samples.put(batch)
            batch, last_send = [], t1
    samples.put(batch)


class IdleSpeedProbe:
    """Contract: `start()` spawns the probe process (a no-op where the OS has no `SCHED_IDLE`:
    `available` is then False); `take()` returns the samples received since the last `take()`
    (the child sends them every `SEND_EVERY_S`, so the latest half second may not be there yet);
    `stop()` ends the process and returns the samples left: within `STOP_WAIT_S` plus 5 s, when
    it does not end by itself it is killed and its unsent samples are dropped. The child also
    ends when its parent is gone. Usable as a context manager. Side effects: one child process
    that keeps a core busy whenever nothing else wants it, and 64 MiB of memory; a thread here
    that reads its timings as they come."""

    def __init__(self, rows: int = MATRIX_ROWS) -> None:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.rows = rows
        self.available = hasattr(os, "SCHED_IDLE") and hasattr(os, "sched_setscheduler")
        self._ctx = mp.get_context("spawn")
        self._process = None
        self._samples = None
        self._stop = None
        self._reader: threading.Thread | None = None
        self._received: list[ProbeSample] = []
        self._lock = threading.Lock()
        self._reading = threading.Event()

    def start(self) -> IdleSpeedProbe:
        if not self.available or self._process is not None:
            return self
        self._samples, self._stop = self._ctx.Queue(), self._ctx.Event()
        self._process = self._ctx.Process(target=_probe_loop, args=(self.rows, self._samples, self._stop, os.getpid()),
                                          name="sagellm-idle-speed-probe", daemon=True)
        self._process.start()
        # The pipe holds only ~64 KiB: read it all the time, or `take()` would get old timings.
        self._reading.set()
        self._reader = threading.Thread(target=self._read, name="idle-speed-probe-reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        while self._reading.is_set():
            try:
                batch = self._samples.get(timeout=0.2)
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return
            self._keep(batch)

    def _keep(self, batch: list[tuple[float, float]]) -> None:
        with self._lock:
            self._received.extend(ProbeSample(t, s) for t, s in batch)

    def take(self) -> list[ProbeSample]:
        with self._lock:
            out, self._received = self._received, []
        return out

    def stop(self) -> list[ProbeSample]:
        if self._process is None:
            return []
        self._stop.set()
        self._process.join(timeout=STOP_WAIT_S)  # the child sends its last timings, then ends
        killed = self._process.is_alive()
        if killed:
            self._process.kill()
            self._process.join(timeout=5.0)
        self._reading.clear()
        self._reader.join(timeout=5.0)
        if killed:
            # Killed mid-write, the child may leave half a message in the pipe: read nothing more.
            self._samples.cancel_join_thread()
        else:
            while True:  # the child has ended, so whatever it sent last is in the pipe
                try:
                    self._keep(self._samples.get_nowait())
                except queue.Empty:
                    break
        self._samples.close()
        left = self.take()
        self._process = self._samples = self._stop = self._reader = None
        return left

    def __enter__(self) -> IdleSpeedProbe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def median_seconds(samples: list[ProbeSample], start: float | None = None, end: float | None = None) -> float | None:
    """The median kernel time of the samples that ended in [start, end] (monotonic; None: open),
    or None when there are none."""
    times = [s.seconds for s in samples
             if (start is None or s.end_time >= start) and (end is None or s.end_time <= end)]
    return statistics.median(times) if times else None
