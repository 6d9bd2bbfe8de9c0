"""Hardware detection: which torch device to run on and what it is."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sagellm.backends.cpuinfo import cpu_model_name


@dataclass(frozen=True)
class DeviceInfo:
    """A device's identity: backend ("cpu", "cuda"), torch device string, name, memory in bytes
    (0 when unknown) and the number of CPU threads torch uses."""

    backend: str
    device: str
    name: str
    total_memory_bytes: int
    num_threads: int


def resolve_device(requested: str = "auto") -> torch.device:
    """`auto` is CUDA when available, else CPU; an explicit CUDA device must exist."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"backend.device: {requested!r} requested but CUDA is not available here")
    return torch.device(requested)


def device_info(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo("cuda", str(device), props.name, props.total_memory, torch.get_num_threads())
    name = cpu_model_name()
    mem = 0
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return DeviceInfo("cpu", "cpu", name, mem, torch.get_num_threads())


def available_memory_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` now (CUDA: free device memory; CPU: the
    kernel's MemAvailable), or None when this system does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
