"""Refuse a KV pool or tier that cannot fit before anything is allocated.

A typo in `kv_cache.memory_gb` or `num_blocks` must give an error naming the field, not a failed
multi-GB allocation inside torch or a machine driven into swap. The check compares what the pool
and the tiers would take with what the device, host memory and the NVMe directory have free now.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from sagellm.backends.detect import available_memory_bytes
from sagellm.errors import ConfigError

# Leave this share of what is free for activations, the allocator and the rest of the process.
FIT_FRACTION = 0.9


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def check_kv_fits(device: torch.device, block_bytes: int, device_blocks: int, ddr_blocks: int,
                  nvme_blocks: int, nvme_path: str | None, pool_field: str = "memory_gb") -> None:
    """ConfigError naming the kv_cache field when the device pool (`device_blocks`, sized by field
    `pool_field`), the DDR tier or the NVMe tier of blocks of `block_bytes` bytes would take more than
    FIT_FRACTION of what is free."""
    pool, ddr, nvme = device_blocks * block_bytes, ddr_blocks * block_bytes, nvme_blocks * block_bytes
    on_host = pool + ddr if device.type == "cpu" else ddr
    free_device = available_memory_bytes(device)
    if device.type != "cpu" and free_device is not None and pool > FIT_FRACTION * free_device:
        raise ConfigError(f"kv_cache.{pool_field}: a KV pool of {device_blocks} blocks ({_gib(pool)}) does not fit in "
                          f"the {_gib(free_device)} free on {device}; lower kv_cache.memory_gb or num_blocks")
    free_host = available_memory_bytes(torch.device("cpu"))
    if free_host is not None and on_host > FIT_FRACTION * free_host:
        field = pool_field if device.type == "cpu" and pool > FIT_FRACTION * free_host else "ddr_memory_gb"
        raise ConfigError(
            f"kv_cache.{field}: the KV pool ({_gib(pool)}, {device_blocks} blocks) and the DDR tier ({_gib(ddr)}) "
            f"need {_gib(on_host)} of host memory but {_gib(free_host)} is available; lower kv_cache.memory_gb / "
            "num_blocks or ddr_memory_gb / ddr_num_blocks")
    if nvme:
        directory = Path(nvme_path) if nvme_path else Path(tempfile.gettempdir())
        existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("/"))
        free_disk = shutil.disk_usage(existing).free
        if nvme > FIT_FRACTION * free_disk:
            raise ConfigError(f"kv_cache.nvme_memory_gb: an NVMe tier of {_gib(nvme)} does not fit in the "
                              f"{_gib(free_disk)} free under {existing}; lower nvme_memory_gb / nvme_num_blocks")
