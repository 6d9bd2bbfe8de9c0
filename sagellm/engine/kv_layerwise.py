"""KV copies layer by layer, overlapped with the forward pass (`KVGranularity.LAYER`).

Per layer, the operations of a step are independent: running every operation's layer-l part in
order, for l = 0, 1, ..., leaves the same state as running each operation whole, in order. So a
background thread copies layer 0 of every operation, signals, copies layer 1, ..., while the
forward pass waits only for the layer it is about to compute. File (NVMe) reads are checked and
staged before the step, file writes happen after the last layer.
"""

from __future__ import annotations

import threading

import torch

from sagellm.core.kv.tiers import KVOp
from sagellm.engine.kv_tiers import KVTransferExecutor

WAIT_TIMEOUT_S = 600.0  # a copy thread that stalls this long fails the step instead of hanging it


class LayerwiseTransfer:
    """One step's KV operations, carried out layer by layer on a background thread.

    Contract: `start(ops)` checks every source first (NVMe checksums, DDR validity), starts the
    copies and returns the device blocks whose load failed (they receive nothing). `wait(l)` blocks
    until every operation's layer-l part is done; `finish()` waits for the rest (NVMe writes) and
    re-raises any error of the copy thread. Not reentrant: one step at a time.
    """

    def __init__(self, transfers: KVTransferExecutor) -> None:
        self.transfers = transfers
        self.num_layers = transfers.block_shape[0]
        self._events: list[threading.Event] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, ops: tuple[KVOp, ...]) -> list[int]:
        tr = self.transfers
        failed: list[int] = []
        # Each copy becomes (src kind, src, dst kind, dst): kinds "hbm" and "ddr" index the stores,
        # "buf" is a whole block in memory (read from NVMe before the step, or bound for NVMe after it).
        plan: list[tuple[str, object, str, object] | None] = []  # None: a drop (ends a batched run)
        nvme_pending: dict[int, torch.Tensor] = {}  # NVMe slot -> the block this step writes there
        for op in ops:  # validity bookkeeping in order, as the whole-block path does it
            if op.dst_tier is None:
                plan.append(None)
                if op.src_tier == "nvme":
                    tr.nvme.forget(op.src_index)
                    nvme_pending.pop(op.src_index, None)
                elif op.src_tier == "ddr":
                    tr.ddr.valid[op.src_index] = False
                continue
            ok, src_kind, src = True, op.src_tier, op.src_index
            if op.src_tier == "nvme":
                src_kind = "buf"
                if op.src_index in nvme_pending:
                    src = nvme_pending.pop(op.src_index)
                else:
                    data = tr.nvme.read(op.src_index)
                    ok = data is not None
                    src = tr._from_bytes(data) if ok else None
                tr.nvme.forget(op.src_index)
            elif op.src_tier == "ddr":
                ok = tr.ddr.valid[op.src_index]
                tr.ddr.valid[op.src_index] = False
            dst_kind, dst = op.dst_tier, op.dst_index
            if op.dst_tier == "ddr":
                tr.ddr.valid[op.dst_index] = ok
            elif op.dst_tier == "nvme":
                dst_kind = "buf"
                if ok:
                    dst = nvme_pending[op.dst_index] = torch.empty(tr.block_shape, dtype=tr.dtype)
                else:
                    nvme_pending.pop(op.dst_index, None)
                    tr.nvme.forget(op.dst_index)
            if not ok:
                if op.dst_tier == "hbm":
                    failed.append(op.dst_index)
                continue
            plan.append((src_kind, src, dst_kind, dst))
        self._events = [threading.Event() for _ in range(self.num_layers)]
        self._error = None
        self._thread = threading.Thread(target=self._copy, args=(plan, nvme_pending, self._events), daemon=True,
                                        name="sagellm-kv-layerwise")
        self._thread.start()
        return failed

    def wait(self, layer: int) -> None:
        if not self._events[layer].wait(WAIT_TIMEOUT_S):
            raise RuntimeError(f"layer-wise KV copy: layer {layer} not ready after {WAIT_TIMEOUT_S:.0f} s")
        if self._error is not None:
            raise RuntimeError("layer-wise KV copy failed") from self._error

    def finish(self) -> None:
        if self._thread is not None:
            self._thread.join(WAIT_TIMEOUT_S)
            if self._thread.is_alive():
                raise RuntimeError(f"layer-wise KV copy still running after {WAIT_TIMEOUT_S:.0f} s")
            self._thread = None
        if self._error is not None:
            raise RuntimeError("layer-wise KV copy failed") from self._error

    def _copy(self, plan: list[tuple[str, object, str, object] | None], nvme_writes: dict[int, torch.Tensor],
              events: list[threading.Event]) -> None:
        try:
            tr = self.transfers
            cache = tr.cache.tensor
            dev = cache.device
            # Runs of device/host copies in the same direction move as one indexed copy per layer; a
            # drop, a memory block or an index seen before in the run ends it (as `op_groups` does).
            runs: list[tuple[str, str, list, list]] = []
            open_run = False
            for item in plan:
                if item is None:
                    open_run = False
                    continue
                src_kind, src, dst_kind, dst = item
                batchable = src_kind != "buf" and dst_kind != "buf"
                last = runs[-1] if runs else None
                if (batchable and open_run and last[0] == src_kind and last[1] == dst_kind
                        and src not in last[2] and dst not in last[3]):
                    last[2].append(src)
                    last[3].append(dst)
                else:
                    runs.append((src_kind, dst_kind, [src], [dst]))
                    open_run = batchable
            indexed = [(sk, dk, self._index(sk, srcs, dev), self._index(dk, dsts, dev)) for sk, dk, srcs, dsts in runs]
            for layer in range(self.num_layers):
                for src_kind, dst_kind, src, dst in indexed:
                    if src_kind == "hbm":
                        data = cache[layer].index_select(1, src).transpose(0, 1)  # [n, 2, bs, H, D]
                    elif src_kind == "ddr":
                        data = tr.ddr.tensor[src, layer]
                    else:
                        data = src[layer].unsqueeze(0)
                    if dst_kind == "hbm":
                        cache[layer].index_copy_(1, dst, data.to(dev).transpose(0, 1))
                    elif dst_kind == "ddr":
                        tr.ddr.tensor[dst, layer] = data.to("cpu")
                    else:
                        dst[layer].copy_(data[0])
                events[layer].set()
            for slot, block in nvme_writes.items():
                tr.nvme.write(slot, tr._to_bytes(block))
        except BaseException as exc:  # surfaced to the forward pass by wait() / finish()
            self._error = exc
        finally:
            for event in events:
                event.set()

    @staticmethod
    def _index(kind: str, refs: list, device: torch.device) -> object:
        if kind == "buf":
            return refs[0]
        return torch.tensor(refs, dtype=torch.long, device=device if kind == "hbm" else "cpu")
