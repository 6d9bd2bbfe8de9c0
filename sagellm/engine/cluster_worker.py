"""One worker process of a `ClusterEngine`: a `SageLLMEngine` in one role, driven over queues.

Commands in (a queue per worker): ("add", GenerateRequest, decode worker or None), ("probe",),
("reset_cache",), ("stats",), ("start_step_log",), ("take_step_log",), ("decode_dead", index),
("redirect", request id, decode worker), ("stop",). Events out (one queue shared by
all workers): ("ready", worker, info), ("done", worker, GenerateOutput) - a prefill worker's
output with finish_reason "prefilled" means the request continues on its decode worker -,
("handoff", worker, request id, seconds, bytes), ("reply", worker, kind, value), ("fatal", worker, message),
and ("state", worker, ReplicaState) after each step when the router reads replica state.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import traceback
from typing import Any

log = logging.getLogger(__name__)

ROLES = ("standard", "prefill_only", "decode_only")


def worker_main(index: int, role: str, config: dict[str, Any], commands: Any, events: Any,
                kv_inbox: Any, kv_outboxes: dict[int, Any], prefill_index: int = 0,
                report_state: bool = False) -> None:
    """Process entry point (spawned). Runs until ("stop",) or its parent goes away. With
    `report_state`, posts ("state", worker, ReplicaState) after every step for the router."""
    import torch.multiprocessing  # noqa: F401  (registers the shared-memory tensor reductions)

    from sagellm.config import SageLLMConfig
    from sagellm.core.kv.tiers import KVGranularity
    from sagellm.engine.engine import SageLLMEngine
    from sagellm.engine.pd_transport import HandoffReceiver, HandoffSender

    try:
        cfg = SageLLMConfig.from_dict(config)
        if role != "standard":  # a worker of a strict cluster: one role, no cluster of its own
            cfg = cfg.replace(scheduler={"mode": "hybrid", "inference_mode": role})
        engine = SageLLMEngine(cfg).initialize()
    except Exception as exc:
        events.put(("fatal", index, f"worker {index} ({role}) failed to start: {exc!r}\n{traceback.format_exc()}"))
        return
    engine.worker_index = prefill_index
    if report_state:
        engine.on_state = lambda state: events.put(("state", index, state))
    receiver = None
    sender = None
    if role == "prefill_only":
        layerwise = cfg.kv_cache.granularity == KVGranularity.LAYER.value
        sender = HandoffSender(engine.kv_cache, kv_outboxes, layerwise)
        engine.set_handoff(sender)
    elif role == "decode_only":
        def ready(meta, kv, received_at: float) -> None:
            rid = meta.request.request_id
            events.put(("handoff", index, rid, received_at - meta.first_token_time, kv.nbytes))
            try:
                engine.submit_prefilled(meta, kv, lambda out: events.put(("done", index, out)))
            except RuntimeError as exc:
                events.put(("fatal", index, f"decode worker {index}: {exc}"))

        receiver = HandoffReceiver(kv_inbox, engine.shape.num_layers, ready)
    events.put(("ready", index, {"vocab_size": engine.shape.vocab_size, "max_model_len": engine.max_model_len,
                                 "num_layers": engine.shape.num_layers, "model": engine.shape.name,
                                 "num_device_blocks": engine.kv_manager.num_blocks}))
    try:
        _serve(index, engine, sender, commands, events)
    finally:
        if receiver is not None:
            receiver.stop()
        engine.shutdown()


def _serve(index: int, engine: Any, sender: Any, commands: Any, events: Any) -> None:
    from sagellm.engine.types import rejected_output

    def done(out: Any) -> None:
        events.put(("done", index, out))

    while True:
        try:
            cmd = commands.get(timeout=1.0)
        except queue.Empty:
            continue
        except (EOFError, OSError):
            return  # the coordinator is gone
        kind = cmd[0]
        if kind == "stop":
            return
        if kind == "add":
            request, decode_worker = cmd[1], cmd[2]
            if sender is not None:
                sender.destinations[request.request_id] = decode_worker
            try:
                engine.submit(request, done)
            except ValueError as exc:
                if sender is not None:
                    sender.destinations.pop(request.request_id, None)
                events.put(("done", index, rejected_output(request, str(exc))))
        elif kind == "decode_dead" and sender is not None:
            sender.mark_dead(cmd[1])
        elif kind == "redirect" and sender is not None:
            sender.redirect(cmd[1], cmd[2])
        elif kind == "probe":
            events.put(("reply", index, "probe", engine.probe()))
        elif kind == "reset_cache":
            engine.reset_prefix_cache()
            events.put(("reply", index, "reset_cache", True))
        elif kind == "stats":
            events.put(("reply", index, "stats", engine.get_stats()))
        elif kind == "start_step_log":
            engine.start_step_log()
            events.put(("reply", index, "start_step_log", True))
        elif kind == "take_step_log":
            events.put(("reply", index, "take_step_log",
                        [dataclasses.replace(s, worker=index) for s in engine.take_step_log()]))
