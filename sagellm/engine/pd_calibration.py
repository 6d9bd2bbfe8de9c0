"""Times the live prefill-to-decode KV hand-off, for the simulator's "hbm->peer" link.

A STRICT cluster of one prefill and one decode worker serves one request at a time with prompts
of several lengths; each hand-off's measured duration (end of the prefill step to the last byte
at the decode worker) and size are fitted as latency + bytes / bandwidth, the form
`ProfiledCostModel.transfer_time(bytes, "hbm", "peer")` prices.
"""

from __future__ import annotations

import statistics

from sagellm.config import SageLLMConfig
from sagellm.engine.kv_calibration import _fit

PROMPT_LENGTHS = (16, 64, 160, 320, 640, 1200)


def measure_handoff_link(config: SageLLMConfig, repeats: int = 5,
                         prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS) -> dict[str, float]:
    """{"bandwidth": bytes/s, "latency": s, "samples": n} of the block-wise hand-off between two
    worker processes built from `config` (its thread count and dtype). Side effects: runs a cluster."""
    from sagellm.engine.cluster import ClusterEngine
    from sagellm.engine.types import GenerateRequest

    cfg = config.replace(scheduler={"mode": "strict", "inference_mode": "standard", "prefill_workers": 1,
                                    "decode_workers": 1}, kv_cache={"granularity": "block"})
    by_size: dict[int, list[float]] = {}
    with ClusterEngine(cfg) as engine:
        for n in prompt_lengths:
            for r in range(repeats + 1):
                engine.generate(GenerateRequest(prompt_token_ids=tuple(1 + (i * 7 + r) % 1000 for i in range(n)),
                                                max_new_tokens=2, temperature=0.0, ignore_eos=True,
                                                request_id=f"pd-calib-{n}-{r}"))
                if r:  # the first of each size warms the path up
                    by_size.setdefault(engine.handoff_bytes[-1], []).append(engine.handoff_seconds[-1])
    sizes = sorted(by_size)
    link = _fit([float(b) for b in sizes], [statistics.median(by_size[b]) for b in sizes])
    link["samples"] = sum(len(v) for v in by_size.values())
    return link
