"""The engine's lower KV tiers and the copies between them: real tensors, real files.

The policy layer decides (`KVOp`s in each `SchedulerOutput`); `KVTransferExecutor` carries the
operations out before the step's forward pass. Blocks move whole: one block of every layer, K and
V, `[num_layers, 2, block_size, num_kv_heads, head_dim]`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

from sagellm.core.kv.tiers import KVOp, op_groups
from sagellm.errors import ConfigError, show
from sagellm.models.attention import PagedKVCache


class HostKVStore:
    """DDR tier: `num_slots` blocks in host memory (pinned when the device is CUDA).

    `valid[slot]` is False until an offload writes the slot, and after a promotion into it failed:
    reading an invalid slot is a failed load, never served.
    """

    def __init__(self, num_slots: int, block_shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> None:
        self.tensor = torch.zeros((num_slots, *block_shape), dtype=dtype, pin_memory=pin)
        self.valid = [False] * num_slots


class FileKVStore:
    """NVMe tier: `num_slots` blocks in one file under `directory`, with a CRC-32 per written slot.

    `read` returns None when the slot was never written, the file is truncated, or the bytes no
    longer match their checksum: corrupted KV is detected, never returned. Side effects: creates
    the file (removed by `close` when the directory was made here).
    """

    def __init__(self, directory: str | None, num_slots: int, block_nbytes: int) -> None:
        self._owns_dir = directory is None
        try:
            self.directory = Path(directory or tempfile.mkdtemp(prefix="sagellm-nvme-"))
            self.directory.mkdir(parents=True, exist_ok=True)
            self.path = self.directory / f"kv-{os.getpid()}-{id(self):x}.bin"
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise ConfigError(f"kv_cache.nvme_path: cannot create the NVMe tier's file under {show(directory)}: "
                              f"{exc.strerror or exc}") from None
        self.block_nbytes = block_nbytes
        self.num_slots = num_slots
        self.checksums: dict[int, int] = {}

    def write(self, slot: int, data: bytes) -> None:
        os.pwrite(self._fd, data, slot * self.block_nbytes)
        self.checksums[slot] = zlib.crc32(data)

    def read(self, slot: int) -> bytes | None:
        expected = self.checksums.get(slot)
        if expected is None:
            return None
        data = os.pread(self._fd, self.block_nbytes, slot * self.block_nbytes)
        if len(data) != self.block_nbytes or zlib.crc32(data) != expected:
            return None
        return data

    def forget(self, slot: int) -> None:
        self.checksums.pop(slot, None)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)


class KVTransferExecutor:
    """Runs a step's KV operations in order against the device cache and the lower tiers.

    Contract: `run(ops)` returns the device blocks whose load failed (a source that fails its
    checksum or was never validly written); those blocks hold no usable KV and the step must not
    read them. Copies between device and host are batched per run of same-direction operations.
    `staging` holds the KV handed off to this (decode) worker, per request, as
    `[layers, 2, blocks, block_size, kv_heads, head_dim]`; a `receive` operation copies block
    `src_index` of its request's staged KV into device block `dst_index`, and a request's staged
    KV is dropped after its receives ran (a receive with nothing staged fails its block).
    """

    def __init__(self, cache: PagedKVCache, ddr_slots: int, nvme_slots: int, nvme_path: str | None) -> None:
        self.cache = cache
        t = cache.tensor
        self.block_shape = (t.shape[0], t.shape[1], *t.shape[3:])
        self.block_numel = t[:, :, 0].numel()
        self.dtype = t.dtype
        self.ddr = HostKVStore(ddr_slots, self.block_shape, t.dtype, t.device.type == "cuda") if ddr_slots else None
        nbytes = self.block_numel * t.element_size()
        self.nvme = FileKVStore(nvme_path, nvme_slots, nbytes) if nvme_slots else None
        self.staging: dict[str, torch.Tensor] = {}

    def close(self) -> None:
        if self.nvme is not None:
            self.nvme.close()

    def distrust(self, ops: tuple[KVOp, ...]) -> None:
        """Mark every lower-tier slot `ops` write as invalid (their step failed part-way)."""
        for op in ops:
            if op.dst_tier == "ddr":
                self.ddr.valid[op.dst_index] = False
            elif op.dst_tier == "nvme":
                self.nvme.forget(op.dst_index)

    def run(self, ops: tuple[KVOp, ...]) -> list[int]:
        failed: list[int] = []
        for src, dst, group in op_groups(ops):
            if dst is None:
                if src == "nvme":
                    self.nvme.forget(group[0].src_index)
                elif src == "ddr":
                    self.ddr.valid[group[0].src_index] = False
                continue
            failed += getattr(self, f"_{src}_to_{dst}")(group)
        return failed

    def _staging_to_hbm(self, group: list[KVOp]) -> list[int]:
        failed: list[int] = []
        by_request: dict[str, list[KVOp]] = {}
        for op in group:
            by_request.setdefault(op.request_id, []).append(op)
        device = self.cache.tensor.device
        for rid, ops in by_request.items():
            staged = self.staging.pop(rid, None)
            if staged is None or max(op.src_index for op in ops) >= staged.shape[2]:
                failed += [op.dst_index for op in ops]
                continue
            src = torch.tensor([op.src_index for op in ops], dtype=torch.long, device=staged.device)
            dst = torch.tensor([op.dst_index for op in ops], dtype=torch.long, device=device)
            self.cache.tensor.index_copy_(2, dst, staged.index_select(2, src).to(device))
        return failed

    # ---- one method per direction -------------------------------------------------------------
    def _device_blocks(self, blocks: list[int]) -> torch.Tensor:
        index = torch.tensor(blocks, dtype=torch.long, device=self.cache.tensor.device)
        return self.cache.tensor.index_select(2, index).permute(2, 0, 1, 3, 4, 5)

    def _hbm_to_ddr(self, group: list[KVOp]) -> list[int]:
        slots = [op.dst_index for op in group]
        self.ddr.tensor[torch.tensor(slots)] = self._device_blocks([op.src_index for op in group]).to("cpu")
        for s in slots:
            self.ddr.valid[s] = True
        return []

    def _ddr_to_hbm(self, group: list[KVOp]) -> list[int]:
        valid = self.ddr.valid
        ok = [op for op in group if valid[op.src_index]]
        failed = [op.dst_index for op in group if not valid[op.src_index]]
        for op in group:
            valid[op.src_index] = False
        if ok:
            src = self.ddr.tensor[torch.tensor([op.src_index for op in ok])]
            index = torch.tensor([op.dst_index for op in ok], dtype=torch.long, device=self.cache.tensor.device)
            self.cache.tensor.index_copy_(2, index, src.to(self.cache.tensor.device).permute(1, 2, 0, 3, 4, 5))
        return failed

    def _to_bytes(self, block: torch.Tensor) -> bytes:
        return block.contiguous().view(torch.uint8).numpy().tobytes()

    def _from_bytes(self, data: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(self.dtype).view(self.block_shape)

    def _hbm_to_nvme(self, group: list[KVOp]) -> list[int]:
        blocks = self._device_blocks([op.src_index for op in group]).to("cpu")
        for op, block in zip(group, blocks):
            self.nvme.write(op.dst_index, self._to_bytes(block))
        return []

    def _ddr_to_nvme(self, group: list[KVOp]) -> list[int]:
        for op in group:
            if self.ddr.valid[op.src_index]:
                self.nvme.write(op.dst_index, self._to_bytes(self.ddr.tensor[op.src_index]))
            else:
                self.nvme.forget(op.dst_index)
            self.ddr.valid[op.src_index] = False
        return []

    def _nvme_to_ddr(self, group: list[KVOp]) -> list[int]:
        for op in group:
            data = self.nvme.read(op.src_index)
            self.nvme.forget(op.src_index)
            if data is None:
                self.ddr.valid[op.dst_index] = False  # the failure surfaces when a load reads it
                continue
            self.ddr.tensor[op.dst_index] = self._from_bytes(data)
            self.ddr.valid[op.dst_index] = True
        return []

    def _nvme_to_hbm(self, group: list[KVOp]) -> list[int]:
        failed = []
        device = self.cache.tensor.device
        for op in group:
            data = self.nvme.read(op.src_index)
            self.nvme.forget(op.src_index)
            if data is None:
                failed.append(op.dst_index)
                continue
            self.cache.tensor[:, :, op.dst_index] = self._from_bytes(data).to(device)
        return failed
