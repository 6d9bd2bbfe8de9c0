"""The KV hand-off between a prefill worker process and a decode worker process, over shared memory.

Transport: one `torch.multiprocessing` queue per decode worker. A tensor put on it is moved into
shared memory by the queue's feeder thread and arrives as a view of that memory (file
descriptors passed between the processes), so the KV crosses without sockets or serialization.
On CUDA the same queues pass CUDA IPC handles.

Per request the prefill worker sends, in order: the KV (one `[layers, 2, blocks, block_size,
kv_heads, head_dim]` tensor after the step, or one `[2, blocks, ...]` piece per layer while the
step runs under `KVGranularity.LAYER`), then a `HandoffMeta` (the request and its first token)
or a discard (the request ended with its first token).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sagellm.core.request import Request, RequestStatus
from sagellm.models.attention import PagedKVCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandoffMeta:
    """What a decode worker needs besides the KV: the original request (a `GenerateRequest`), its
    prompt ids, the first token, and the prefill worker's times (monotonic clock, shared by the
    processes of one machine)."""

    request: Any
    prompt_ids: tuple[int, ...]
    first_token: int
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float
    prefill_worker: int


class HandoffSender:
    """The prefill worker's side. Called from its engine loop thread only.

    Contract: `destinations[request_id]` names each request's decode worker before its prompt
    completes (`redirect` changes it). `begin(handoffs)` takes (request id, device block ids) for
    the step's hand-offs; `layer_done(l)` (layer-wise) sends layer l of each during the forward
    pass; `complete(request, meta)`, called after the step's update and before the next step can
    overwrite the blocks, sends the whole KV (block-wise, or after a redirect) and the meta when
    the request was FINISHED_PREFILLED, else a discard. Requests bound for a decode worker marked
    dead (`mark_dead`) are dropped. Side effects: puts tensors on the decode workers' queues.
    """

    def __init__(self, cache: PagedKVCache, outboxes: dict[int, Any], layerwise: bool) -> None:
        self.cache = cache
        self.outboxes = outboxes
        self.layerwise = layerwise
        self.destinations: dict[str, int] = {}
        self.dead: set[int] = set()
        self._step: list[tuple[str, torch.Tensor]] = []
        self._blocks: dict[str, torch.Tensor] = {}  # rid -> its prompt's device blocks
        self._sent_to: dict[str, int] = {}  # where a layer-wise hand-off's pieces went

    def mark_dead(self, decode_worker: int) -> None:
        self.dead.add(decode_worker)

    def redirect(self, request_id: str, decode_worker: int) -> None:
        self.destinations[request_id] = decode_worker

    def _put(self, rid: str, message: tuple) -> None:
        dest = self.destinations.get(rid)
        if dest is None or dest in self.dead:
            return
        self.outboxes[dest].put(message)

    def begin(self, handoffs: list[tuple[str, list[int]]]) -> None:
        device = self.cache.tensor.device
        self._step = [(rid, torch.tensor(blocks, dtype=torch.long, device=device)) for rid, blocks in handoffs]
        self._blocks.update(self._step)
        if self.layerwise:
            self._sent_to.update((rid, self.destinations.get(rid)) for rid, _ in handoffs)

    def layer_done(self, layer: int) -> None:
        for rid, index in self._step:
            self._put(rid, ("kv", rid, layer, self.cache.tensor[layer].index_select(1, index)))

    def complete(self, request: Request, meta: HandoffMeta | None) -> None:
        rid = request.request_id
        index = self._blocks.pop(rid, None)
        sent_to = self._sent_to.pop(rid, None)
        if index is not None:
            if request.status is RequestStatus.FINISHED_PREFILLED and meta is not None:
                if not self.layerwise or sent_to != self.destinations.get(rid):
                    self._put(rid, ("kv", rid, None, self.cache.tensor.index_select(2, index)))
                self._put(rid, ("meta", rid, meta))
            elif sent_to is not None:
                self._put(rid, ("discard", rid))
        self.destinations.pop(rid, None)


class HandoffReceiver:
    """The decode worker's side: a thread that assembles hand-offs from its queue.

    Contract: for each request whose KV and meta have both arrived, calls `on_ready(meta, kv,
    received_at)` with the KV as one `[layers, 2, blocks, ...]` tensor; a discard forgets what
    arrived. Per-layer pieces are copied into one tensor as they come (releasing their shared
    memory). `stop()` ends the thread. Side effects: none beyond the callback.
    """

    def __init__(self, inbox: Any, num_layers: int, on_ready: Callable[[HandoffMeta, torch.Tensor, float], None]
                 ) -> None:
        self.inbox = inbox
        self.num_layers = num_layers
        self.on_ready = on_ready
        self._partial: dict[str, list] = {}  # rid -> [kv tensor or None, layers received]
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sagellm-kv-receiver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stopping:
            try:
                msg = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return
            try:
                self._handle(msg)
            except Exception:  # a bad message must not stop the hand-offs of other requests
                log.exception("KV hand-off message %r failed", msg[:2])

    def _handle(self, msg: tuple) -> None:
        kind, rid = msg[0], msg[1]
        if kind == "discard":
            self._partial.pop(rid, None)
            return
        entry = self._partial.setdefault(rid, [None, set(), None])  # KV, layers received, meta
        if kind == "kv":
            layer, tensor = msg[2], msg[3]
            if layer is None:
                entry[0], entry[1] = tensor, set(range(self.num_layers))
            else:
                if entry[0] is None or entry[0].shape[1:] != tensor.shape:
                    entry[0] = torch.empty((self.num_layers, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
                    entry[1] = set()
                entry[0][layer].copy_(tensor)
                entry[1].add(layer)
        elif kind == "meta":
            entry[2] = msg[2]
        if entry[2] is not None and len(entry[1]) == self.num_layers:
            del self._partial[rid]
            self.on_ready(entry[2], entry[0], time.monotonic())
