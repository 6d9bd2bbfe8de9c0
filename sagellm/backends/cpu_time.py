"""How much CPU the machine gave this VM: steal time from /proc/stat (Linux), for noisy-machine reports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU times (in clock ticks, all CPUs) from the first line of /proc/stat."""

    busy: int
    idle: int
    steal: int

    @classmethod
    def read(cls) -> CpuTimes | None:
        """Now; None where /proc/stat is unavailable."""
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq = fields[:7]
        steal = fields[7] if len(fields) > 7 else 0
        return cls(user + nice + system + irq + softirq, idle + iowait, steal)


def steal_fraction(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """Share of the interval's CPU time the hypervisor gave to other guests (0..1), or None."""
    if before is None or after is None:
        return None
    total = (after.busy + after.idle + after.steal) - (before.busy + before.idle + before.steal)
    return (after.steal - before.steal) / total if total > 0 else None
