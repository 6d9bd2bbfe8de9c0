"""The idle-time speed probe: it times its kernel while the machine has a free core, and stops cleanly."""

from __future__ import annotations

import os
import time

import pytest

from sagellm.backends.idle_speed_probe import IdleSpeedProbe, ProbeSample, median_seconds

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="needs Linux's SCHED_IDLE")


def test_the_probe_times_its_kernel_on_an_idle_core_and_its_process_ends_on_stop():
    probe = IdleSpeedProbe(rows=512).start()
    process = probe._process
    deadline = time.monotonic() + 30
    while os.sched_getscheduler(process.pid) != os.SCHED_IDLE and time.monotonic() < deadline:
        time.sleep(0.05)  # the child switches itself once started
    assert os.sched_getscheduler(process.pid) == os.SCHED_IDLE
    samples: list[ProbeSample] = []
    deadline = time.monotonic() + 60
    while len(samples) < 20 and time.monotonic() < deadline:
        time.sleep(0.5)
        samples += probe.take()
    # Timings keep coming as they are made, however long nobody took them (the pipe holds ~64 KiB).
    time.sleep(6.0)
    probe.take()
    time.sleep(1.5)
    fresh = probe.take()
    assert fresh and time.monotonic() - fresh[-1].end_time < 1.5
    samples += fresh + probe.stop()
    assert len(samples) >= 20, "no idle core for the probe in 60 s"
    assert not process.is_alive() and probe.stop() == []
    assert all(s.seconds > 0 for s in samples)
    assert [s.end_time for s in samples] == sorted(s.end_time for s in samples)
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the parent keeps its own policy


def test_median_seconds_keeps_the_samples_that_ended_in_the_window():
    samples = [ProbeSample(t, s) for t, s in ((1.0, 0.010), (2.0, 0.020), (3.0, 0.030), (4.0, 0.050))]
    assert median_seconds(samples) == pytest.approx(0.025)
    assert median_seconds(samples, 2.0, 3.5) == pytest.approx(0.025)
    assert median_seconds(samples, start=3.5) == pytest.approx(0.050)
    assert median_seconds(samples, 5.0, 6.0) is None
    with pytest.raises(ValueError, match="rows"):
        IdleSpeedProbe(rows=0)
