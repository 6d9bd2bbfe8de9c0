"""Times the live prefill-to-decode KV hand-off, for the simulator's "hbm->peer" link.

A STRICT cluster of one prefill and one decode worker serves one request at a time with prompts
of several lengths, first block-wise, then layer-wise. Each hand-off's measured duration (end of
the prefill step to the decode worker holding the KV and the request) and size are fitted, both
granularities together, as the affine link `ProfiledCostModel.transfer_time(bytes, "hbm",
"peer")` = latency + bytes / bandwidth that `simulator.pd_cluster.HandoffLink` prices: a
block-wise hand-off takes latency + bytes / bandwidth; a layer-wise one, whose layers left during
the step, latency + (bytes / layers) / bandwidth after it.
"""

from __future__ import annotations

import statistics

from sagellm.config import SageLLMConfig
from sagellm.engine.kv_calibration import fit_link

PROMPT_LENGTHS = (16, 64, 160, 320, 640, 1200)


def measure_handoff_link(config: SageLLMConfig, repeats: int = 5,
                         prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS) -> dict[str, float]:
    """{"bandwidth": bytes/s, "latency": s, "samples": n} of the hand-off between two worker
    processes built from `config` (its thread count and dtype). Side effects: runs two clusters."""
    from sagellm.engine.cluster import ClusterEngine
    from sagellm.engine.types import GenerateRequest

    rows: list[tuple[float, float]] = []  # (bytes that cross after the step, median seconds)
    for granularity in ("block", "layer"):
        cfg = config.replace(scheduler={"mode": "strict", "inference_mode": "standard", "prefill_workers": 1,
                                        "decode_workers": 1}, kv_cache={"granularity": granularity})
        by_size: dict[int, list[float]] = {}
        with ClusterEngine(cfg) as engine:
            layers = engine.workers[0].info["num_layers"]
            for n in prompt_lengths:
                for r in range(repeats + 1):
                    engine.generate(GenerateRequest(
                        prompt_token_ids=tuple(1 + (i * 7 + r) % 1000 for i in range(n)), max_new_tokens=2,
                        temperature=0.0, ignore_eos=True, request_id=f"pd-calib-{granularity}-{n}-{r}"))
                    if r:  # the first of each size warms the path up
                        by_size.setdefault(engine.handoff_bytes[-1], []).append(engine.handoff_seconds[-1])
        share = 1.0 if granularity == "block" else 1.0 / layers
        rows += [(size * share, statistics.median(times)) for size, times in by_size.items()]
    link = fit_link([x for x, _ in rows], [y for _, y in rows])
    link["samples"] = len(rows) * repeats
    return link

