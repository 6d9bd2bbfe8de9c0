"""The STRICT (disaggregated) mode in simulated time: prefill workers, decode workers, KV hand-offs.

The same `sagellm.core` objects as the live cluster decide everything: `PDCoordinator` picks each
request's prefill and decode worker on arrival, a PREFILL_ONLY scheduler ends the request after
its first token, a DECODE_ONLY scheduler admits it once its KV has arrived (with `receive`
operations the predicted executor prices). Only the hand-off's duration is predicted here.
"""

from __future__ import annotations

from collections.abc import Generator

import simpy

from sagellm.core.pd import PDCoordinator
from sagellm.core.request import Request, RequestStatus
from sagellm.metrics import MetricsCollector
from simulator.cost.base import CostModel
from simulator.replica import Replica


class HandoffLink:
    """The path from one prefill worker to the decode workers, used by one hand-off at a time.

    Contract: `finish_time(num_bytes, ready_times)` books the link for one hand-off whose KV is
    sent in `len(ready_times)` equal pieces, piece i ready to leave at `ready_times[i]` (one piece
    after the step for block-wise hand-offs, one per layer during it for layer-wise), and returns
    when the hand-off is complete. The link `cost_model.transfer_time(bytes, "hbm", dst_tier)`
    ("peer" for block-wise hand-offs, "peer_layer" for layer-wise ones, whose many small messages
    cost more each) is affine, latency + bytes / bandwidth: each piece takes its bytes /
    bandwidth, and the latency is paid once per hand-off, after the last piece (the request's meta
    that completes it, as the live transport sends it). So a block-wise hand-off takes
    `transfer_time(all bytes)`.
    """

    def __init__(self, cost_model: CostModel, dst_tier: str = "peer") -> None:
        self.cost_model = cost_model
        self.dst_tier = dst_tier
        self.free_at = 0.0

    def finish_time(self, num_bytes: int, ready_times: list[float]) -> float:
        piece = num_bytes // len(ready_times)
        one = self.cost_model.transfer_time(piece, "hbm", self.dst_tier)
        latency = max(0.0, 2 * one - self.cost_model.transfer_time(2 * piece, "hbm", self.dst_tier))
        per_piece = one - latency
        t = self.free_at
        for ready in ready_times:
            t = max(t, ready) + per_piece
        t += latency
        self.free_at = t
        return t


class StrictCluster:
    """Prefill replicas and decode replicas joined by hand-offs.

    Contract: `submit(request)` assigns the request a prefill and a decode worker (the
    coordinator) and queues it on the prefill worker (ValueError if that scheduler rejects it).
    A request that ends on the prefill worker (its first token was its last) is recorded there;
    one FINISHED_PREFILLED leaves over its worker's `HandoffLink` and joins its decode worker's
    queue when the KV has arrived. `handoff_seconds` lists every hand-off's duration (from the end
    of the prefill step to the arrival of the last byte). `replicas` are the prefill replicas
    then the decode replicas.
    """

    def __init__(self, env: simpy.Environment, prefill: list[Replica], decode: list[Replica],
                 cost_model: CostModel, block_bytes: int, block_size: int, layers: int,
                 collector: MetricsCollector) -> None:
        self.env = env
        self.prefill = prefill
        self.decode = decode
        self.replicas = prefill + decode
        self.coordinator = PDCoordinator(len(prefill), len(decode))
        self.links = [HandoffLink(cost_model, "peer_layer" if layers else "peer") for _ in prefill]
        self.block_bytes = block_bytes
        self.block_size = block_size
        self.layers = layers  # 0: block-wise hand-off after the step; L: layer by layer during it
        self.collector = collector
        self.handoff_seconds: list[float] = []
        self.in_flight = 0
        for i, r in enumerate(prefill):
            r.on_finish = lambda req, start, seconds, i=i: self._prefilled(i, req, start, seconds)
        for r in decode:
            r.on_finish = lambda req, start, seconds, r=r: self._done(req, r.index)

    @property
    def num_outstanding(self) -> int:
        return sum(r.num_outstanding for r in self.replicas) + self.in_flight

    def submit(self, request: Request) -> int:
        p, _ = self.coordinator.assign(request.request_id)
        try:
            self.prefill[p].submit(request)
        except ValueError:
            self.coordinator.complete(request.request_id)
            raise
        return p

    def _done(self, req: Request, replica_index: int) -> None:
        self.coordinator.complete(req.request_id)
        self.collector.add(req, replica_index)

    def _prefilled(self, worker: int, req: Request, step_start: float, step_seconds: float) -> None:
        if req.status is not RequestStatus.FINISHED_PREFILLED:
            self._done(req, self.prefill[worker].index)
            return
        blocks = -(-req.num_prompt_tokens // self.block_size)
        end = step_start + step_seconds
        if self.layers:
            ready = [step_start + step_seconds * (i + 1) / self.layers for i in range(self.layers)]
        else:
            ready = [end]
        arrival = self.links[worker].finish_time(blocks * self.block_bytes, ready)
        self.handoff_seconds.append(arrival - end)
        self.in_flight += 1
        self.env.process(self._deliver(req, arrival))

    def _deliver(self, req: Request, arrival: float) -> Generator[simpy.Event, None, None]:
        if arrival > self.env.now:
            yield self.env.timeout(arrival - self.env.now)
        self.in_flight -= 1
        _, d = self.coordinator.assigned[req.request_id]
        req.remote_kv_tokens = req.num_prompt_tokens
        req.num_computed_tokens = 0
        req.finish_time = None
        self.decode[d].submit(req)

