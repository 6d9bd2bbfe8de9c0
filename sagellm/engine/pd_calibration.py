"""Times the live prefill-to-decode KV hand-off, for the simulator's "hbm->peer" links.

A STRICT cluster of one prefill and one decode worker serves one request at a time with prompts
of several lengths, first block-wise, then layer-wise. Each hand-off's measured duration (end of
the prefill step to the decode worker holding the KV and the request) and size are fitted, one
granularity at a time, as an affine link latency + bytes / bandwidth, the form
`simulator.pd_cluster.HandoffLink` prices:
- block-wise ("hbm->peer"): the whole KV leaves after the step, in one message; the fit is over
  (all bytes, seconds);
- layer-wise ("hbm->peer_layer"): one message per layer leaves during the step, so what is left
  after it is the last layer's piece and the request's meta; the fit is over (bytes / layers,
  seconds).
The two are fitted apart because they are not one link with one latency: a hand-off of many
small messages pays a per-message cost (shared-memory segments, file descriptors passed between
the processes) that one large message pays once.

Then each granularity serves a short Poisson workload, and the hand-offs timed during it give
the link's `serving_factor` (measured / fitted, summed): while both workers compute, the threads
that move the KV share the cores with them, so a hand-off takes longer than one timed alone (the
step-time profile has the same kind of factor, `ProfiledCostModel.serving_factors`).
"""

from __future__ import annotations

import statistics

from sagellm.config import SageLLMConfig
from sagellm.engine.kv_calibration import fit_link, link_time

PROMPT_LENGTHS = (16, 64, 160, 320, 640, 1200)
LINK_NAMES = {"block": "hbm->peer", "layer": "hbm->peer_layer"}


def measure_handoff_link(config: SageLLMConfig, repeats: int = 5,
                         prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS, serving_requests: int = 24
                         ) -> dict[str, dict]:
    """{"hbm->peer": link, "hbm->peer_layer": link}, each {"bandwidth": bytes/s, "latency": s,
    "serving_factor", "samples", "serving_samples", "points": [(bytes that cross after the step,
    median s), ...], "cpu_steal": the share of the CPU other VMs took meanwhile, or None}, of the
    hand-off between two worker processes built from `config` (its thread count and dtype), with
    `serving_requests` requests served per granularity for the factor (0: factor 1). Side
    effects: runs two clusters."""
    from sagellm.backends.cpu_time import CpuTimes, steal_fraction
    from sagellm.engine.cluster import ClusterEngine
    from sagellm.engine.types import GenerateRequest

    links: dict[str, dict] = {}
    for granularity, name in LINK_NAMES.items():
        cfg = config.replace(scheduler={"mode": "strict", "inference_mode": "standard", "prefill_workers": 1,
                                        "decode_workers": 1}, kv_cache={"granularity": granularity})
        by_size: dict[int, list[float]] = {}
        cpu_before = CpuTimes.read()
        with ClusterEngine(cfg) as engine:
            layers = engine.workers[0].info["num_layers"]
            share = 1.0 if granularity == "block" else 1.0 / layers
            for n in prompt_lengths:
                for r in range(repeats + 1):
                    engine.generate(GenerateRequest(
                        prompt_token_ids=tuple(1 + (i * 7 + r) % 1000 for i in range(n)), max_new_tokens=2,
                        temperature=0.0, ignore_eos=True, request_id=f"pd-calib-{granularity}-{n}-{r}"))
                    if r:  # the first of each size warms the path up
                        by_size.setdefault(engine.handoff_bytes[-1], []).append(engine.handoff_seconds[-1])
            points = sorted((size * share, statistics.median(times)) for size, times in by_size.items())
            link = fit_link([x for x, _ in points], [y for _, y in points])
            served = serve_and_time_handoffs(engine, granularity, serving_requests) if serving_requests else []
        factor = handoff_serving_factor(link, served, share) if served else 1.0
        links[name] = {**link, "serving_factor": factor, "samples": sum(len(t) for t in by_size.values()),
                       "serving_samples": len(served), "points": points,
                       "cpu_steal": steal_fraction(cpu_before, CpuTimes.read())}
    return links


def handoff_serving_factor(link: dict[str, float], handoffs: list, share: float = 1.0) -> float:
    """Hand-offs timed while serving ((bytes, seconds) pairs) against the fitted `link`: measured /
    fitted seconds, summed, where each hand-off is priced for `share` of its bytes (1 / layers for
    layer-wise hand-offs: the last layer's piece, what is left after the prefill step)."""
    return sum(seconds for _, seconds in handoffs) / sum(link_time(link, size * share) for size, _ in handoffs)


def serve_and_time_handoffs(engine, granularity: str, num_requests: int = 24, rate: float = 0.5,
                            seed: int = 0) -> list[tuple[int, float]]:
    """(bytes, seconds) of every hand-off while `engine` (a STRICT `ClusterEngine`) serves the
    calibrations' short Poisson workload (`sagellm.engine.calibration.poisson_requests`), open loop."""
    from sagellm.engine.calibration import poisson_requests
    from sagellm.engine.replay import replay

    timed = poisson_requests(num_requests, rate, seed, engine.vocab_size, engine.workers[0].info["max_model_len"],
                             f"pd-calib-serve-{granularity}")
    before = len(engine.handoff_seconds)
    replay(engine, timed)
    return list(zip(engine.handoff_bytes[before:], engine.handoff_seconds[before:]))
