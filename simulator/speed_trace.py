"""The machine's speed over the time of one run, as a step-time multiplier.

On a shared VM a step's time drifts by 5-10% from one 15-second window to the next. An idle-time
speed probe (`sagellm.backends.idle_speed_probe`) timed during a live run gives that drift; a
`SpeedTrace` made from its timings lets the simulator price each step at the speed the machine had
at that moment of the run (`PredictedExecutor(speed=...)`), and the serving reference's steps be
brought back to a nominal speed before they set the serving factors.
"""

from __future__ import annotations

import statistics
from bisect import bisect_right
from collections.abc import Sequence

WINDOW_S = 10.0
MIN_WINDOW_SAMPLES = 10


class SpeedTrace:
    """A piecewise-constant step-time multiplier over a run's time (seconds from its start).

    Contract: `at(t)` is the multiplier of the window holding `t` (the first window's before the
    trace, the last one's after it). Immutable after construction; no side effects.
    """

    def __init__(self, starts: Sequence[float], multipliers: Sequence[float]) -> None:
        if not starts or len(starts) != len(multipliers):
            raise ValueError("a speed trace needs one multiplier per window start, and at least one window")
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError("speed trace: window starts must increase")
        if not all(m > 0 for m in multipliers):
            raise ValueError(f"speed trace: multipliers must be > 0, got {list(multipliers)}")
        self.starts = tuple(float(s) for s in starts)
        self.multipliers = tuple(float(m) for m in multipliers)

    def at(self, t: float) -> float:
        return self.multipliers[max(0, bisect_right(self.starts, t) - 1)]

    def __call__(self, t: float) -> float:
        return self.at(t)

    @classmethod
    def from_probe(cls, end_times: Sequence[float], seconds: Sequence[float], nominal_s: float,
                   window_s: float = WINDOW_S, min_samples: int = MIN_WINDOW_SAMPLES) -> SpeedTrace | None:
        """The trace of a probe's timings (`end_times` from the run's start, `seconds` each) in
        windows of `window_s`: each window's median over `nominal_s`. A window with fewer than
        `min_samples` timings (the machine was busy serving) takes the nearest earlier window's
        multiplier (the first ones, the first full window's). None when no window has enough."""
        if len(end_times) != len(seconds):
            raise ValueError("speed trace: one time per probe timing")
        if not nominal_s > 0 or not window_s > 0:
            raise ValueError("speed trace: nominal_s and window_s must be > 0")
        bins: dict[int, list[float]] = {}
        for t, s in zip(end_times, seconds):
            bins.setdefault(max(0, int(t // window_s)), []).append(s)
        full = {k: statistics.median(v) / nominal_s for k, v in bins.items() if len(v) >= min_samples}
        if not full:
            return None
        last = max(bins)
        current = full[min(full)]
        multipliers = []
        for k in range(last + 1):
            current = full.get(k, current)
            multipliers.append(current)
        return cls([k * window_s for k in range(last + 1)], multipliers)
