"""This machine's CPU name, from /proc/cpuinfo where there is one (standard library only)."""

from __future__ import annotations

import platform


def cpu_model_name() -> str:
    """The "model name" line of /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
