"""The engine's KV copies between tiers: whole-block and layer-wise execution agree, checksums catch damage."""

from __future__ import annotations

import torch

from sagellm.core.kv.tiers import DROP, LOAD, OFFLOAD, PROMOTE, KVOp
from sagellm.engine.kv_layerwise import LayerwiseTransfer
from sagellm.engine.kv_tiers import KVTransferExecutor
from sagellm.models.attention import PagedKVCache

OPS = (
    KVOp(OFFLOAD, "hbm", 0, "ddr", 0), KVOp(OFFLOAD, "hbm", 1, "ddr", 1), KVOp(OFFLOAD, "hbm", 2, "nvme", 0),
    KVOp(OFFLOAD, "ddr", 0, "nvme", 1), KVOp(OFFLOAD, "hbm", 3, "ddr", 0),  # slot 0 reused after its demotion
    KVOp(LOAD, "nvme", 0, "hbm", 0, "r"), KVOp(LOAD, "ddr", 1, "hbm", 1, "r"), KVOp(PROMOTE, "nvme", 1, "ddr", 2),
    KVOp(DROP, "ddr", 3), KVOp(LOAD, "ddr", 2, "hbm", 5, "r"), KVOp(OFFLOAD, "hbm", 6, "nvme", 2),
)


def cache(seed: int = 0) -> PagedKVCache:
    c = PagedKVCache(num_layers=3, num_kv_heads=2, num_blocks=8, block_size=4, head_dim=4, dtype=torch.float32,
                     device=torch.device("cpu"))
    c.tensor.copy_(torch.randn(c.tensor.shape, generator=torch.Generator().manual_seed(seed)))
    return c


def state(tr: KVTransferExecutor) -> tuple:
    ddr = [tr.ddr.tensor[s].clone() if tr.ddr.valid[s] else None for s in range(tr.ddr.tensor.shape[0])]
    nvme = {s: tr.nvme.read(s) for s in sorted(tr.nvme.checksums)}
    return tr.cache.tensor.clone(), ddr, nvme


def test_layer_by_layer_copies_leave_the_same_state_as_whole_blocks(tmp_path) -> None:
    whole = KVTransferExecutor(cache(), 4, 4, str(tmp_path / "a"))
    layered = KVTransferExecutor(cache(), 4, 4, str(tmp_path / "b"))
    try:
        assert whole.run(OPS) == []
        lw = LayerwiseTransfer(layered)
        assert lw.start(OPS) == []
        for layer in range(3):
            lw.wait(layer)
        lw.finish()
        a, b = state(whole), state(layered)
        assert torch.equal(a[0], b[0])
        assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a[1], b[1]))
        assert a[2] == b[2] and len(a[2]) == 1  # only nvme slot 2 still holds a block
        # And the moves did what they say: block 2 went to NVMe and came back as block 0.
        assert torch.equal(whole.cache.tensor[:, :, 0], cache().tensor[:, :, 2])
        assert torch.equal(whole.cache.tensor[:, :, 1], cache().tensor[:, :, 1])
        assert torch.equal(whole.cache.tensor[:, :, 5], cache().tensor[:, :, 0])  # via ddr 0 -> nvme 1 -> ddr 2
    finally:
        whole.close()
        layered.close()


def test_damaged_nvme_blocks_fail_their_load_on_both_paths(tmp_path) -> None:
    for layerwise in (False, True):
        tr = KVTransferExecutor(cache(), 2, 4, str(tmp_path / f"d{layerwise}"))
        try:
            tr.run((KVOp(OFFLOAD, "hbm", 2, "nvme", 0), KVOp(OFFLOAD, "hbm", 3, "nvme", 1)))
            with open(tr.nvme.path, "r+b") as f:
                f.seek(tr.nvme.block_nbytes + 10)  # slot 1 corrupted, slot 0 intact
                f.write(b"\x00\x01\x02")
            before = tr.cache.tensor.clone()
            loads = (KVOp(LOAD, "nvme", 0, "hbm", 6, "r"), KVOp(LOAD, "nvme", 1, "hbm", 7, "r"))
            if layerwise:
                lw = LayerwiseTransfer(tr)
                failed = lw.start(loads)
                lw.finish()
            else:
                failed = tr.run(loads)
            assert failed == [7]
            assert torch.equal(tr.cache.tensor[:, :, 6], before[:, :, 2])
            assert torch.equal(tr.cache.tensor[:, :, 7], before[:, :, 7])  # never served
        finally:
            tr.close()


def test_a_truncated_nvme_file_fails_every_load_past_its_end(tmp_path) -> None:
    tr = KVTransferExecutor(cache(), 0, 2, str(tmp_path))
    try:
        tr.run((KVOp(OFFLOAD, "hbm", 1, "nvme", 0), KVOp(OFFLOAD, "hbm", 2, "nvme", 1)))
        with open(tr.nvme.path, "r+b") as f:
            f.truncate(tr.nvme.block_nbytes + 7)
        assert tr.run((KVOp(LOAD, "nvme", 0, "hbm", 4, "r"), KVOp(LOAD, "nvme", 1, "hbm", 5, "r"))) == [5]
    finally:
        tr.close()
    assert not tmp_path.joinpath(tr.nvme.path.name).exists()
