"""Times the engine's own KV copies between tiers, for the simulator's transfer costs.

"staging->hbm" is a received prefill/decode hand-off copied into the pool (`receive` ops); the
hand-off itself, between processes, is timed by `sagellm.engine.pd_calibration`.

A scratch device cache of the engine's block shape (so serving state is never touched), host and
file stores as the engine builds them, and runs of n = 1..32 blocks per direction: the fitted
latency + bytes / bandwidth of each direction is what `ProfiledCostModel.transfer_time` uses.
"""

from __future__ import annotations

import statistics
import time

import torch

from sagellm.core.kv.tiers import LOAD, OFFLOAD, PROMOTE, RECEIVE, KVOp
from sagellm.engine.kv_tiers import KVTransferExecutor
from sagellm.models.attention import PagedKVCache

DIRECTIONS = (("hbm", "ddr", OFFLOAD), ("ddr", "hbm", LOAD), ("hbm", "nvme", OFFLOAD), ("nvme", "hbm", LOAD),
              ("ddr", "nvme", OFFLOAD), ("nvme", "ddr", PROMOTE), ("staging", "hbm", RECEIVE))
SIZES = (1, 2, 4, 8, 16, 32)


def measure_kv_links(cache: PagedKVCache, repeats: int = 5) -> dict[str, dict[str, float]]:
    """{"src->dst": {"bandwidth": bytes/s, "latency": s}} for every tier pair the engine copies along."""
    t = cache.tensor
    scratch = PagedKVCache(t.shape[0], t.shape[4], max(SIZES), t.shape[3], t.shape[5], t.dtype, t.device)
    scratch.tensor.normal_()
    transfers = KVTransferExecutor(scratch, max(SIZES), max(SIZES), None)
    block_bytes = scratch.tensor[:, :, 0].numel() * scratch.tensor.element_size()
    try:
        # Every slot holds valid content first, so loads measure the real path (checksums included).
        transfers.run(tuple(KVOp(OFFLOAD, "hbm", i, "ddr", i) for i in range(max(SIZES))))
        transfers.run(tuple(KVOp(OFFLOAD, "hbm", i, "nvme", i) for i in range(max(SIZES))))
        links = {}
        for src, dst, kind in DIRECTIONS:
            xs, ys = [], []
            for n in SIZES:
                ops = tuple(KVOp(kind, src, i, dst, i, "calib") for i in range(n))
                times = []
                for _ in range(repeats + 1):
                    refill(transfers, src, n)
                    t0 = time.perf_counter()
                    transfers.run(ops)
                    times.append(time.perf_counter() - t0)
                xs.append(n * block_bytes)
                ys.append(statistics.median(times[1:]))
            links[f"{src}->{dst}"] = fit_link(xs, ys)
        return links
    finally:
        transfers.close()


def refill(transfers: KVTransferExecutor, tier: str, n: int) -> None:
    """Make the first n slots of a lower tier valid again (a load consumes its source)."""
    if tier == "staging":  # a received hand-off of n blocks
        t = transfers.cache.tensor
        transfers.staging["calib"] = t.index_select(2, torch.arange(n, device=t.device)).clone()
    elif tier == "ddr":
        transfers.run(tuple(KVOp(OFFLOAD, "hbm", i, "ddr", i) for i in range(n)))
    elif tier == "nvme":
        transfers.run(tuple(KVOp(OFFLOAD, "hbm", i, "nvme", i) for i in range(n)))


def fit_link(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares seconds y = latency + bytes x / bandwidth on relative error (each row scaled
    by 1 / y, as the step-time fit is), so that sizes spanning orders of magnitude all count;
    latency >= 0 (else a line through the origin)."""
    ws = [1.0 / y for y in ys]
    # weighted normal equations for y*w = latency*w + slope*x*w
    s_ww = sum(w * w for w in ws)
    s_wx = sum(w * w * x for w, x in zip(ws, xs))
    s_xx = sum((w * x) ** 2 for w, x in zip(ws, xs))
    s_wy = sum(w * w * y for w, y in zip(ws, ys))
    s_xy = sum(w * w * x * y for w, x, y in zip(ws, xs, ys))
    det = s_ww * s_xx - s_wx * s_wx
    if det > 0:
        latency = (s_xx * s_wy - s_wx * s_xy) / det
        slope = (s_ww * s_xy - s_wx * s_wy) / det
        if latency >= 0 and slope > 0:
            return {"bandwidth": 1.0 / slope, "latency": latency}
    return {"bandwidth": s_xx / s_xy, "latency": 0.0}


def link_time(link: dict[str, float], num_bytes: float) -> float:
    """Seconds a fitted link (`fit_link`) takes for `num_bytes`: latency + bytes / bandwidth."""
    return link["latency"] + num_bytes / link["bandwidth"]
