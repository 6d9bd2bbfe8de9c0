"""How well the calibrated profile predicts each kind of serving step: pure prefill, mixed, pure decode.

Serves the `experiments/pd_modes.yaml` workload (open loop, one in-process engine, the profile's
thread count) in each scheduling mode given, times every step the engine runs, and prints, per
step kind, the summed predicted seconds (`ProfiledCostModel.step_time`, with its serving factor)
against the summed measured ones. A single serving factor cannot be right for every kind when
these ratios differ; `docs/pd.md` reports what this showed.

    .venv/bin/python benchmarks/step_kinds.py --modes time_share hybrid --num-requests 30
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from experiments.config import ExperimentConfig
from sagellm.core.outputs import SchedulerOutput
from sagellm.engine import GenerateRequest, SageLLMEngine
from sagellm.engine.replay import replay
from simulator.build import build_cost_model, resolve_shape
from simulator.workloads import generate, prompt_token_ids

ROOT = Path(__file__).resolve().parent.parent


def step_kind(out: SchedulerOutput, prompt_lens: dict[str, int]) -> str:
    decodes = sum(start >= prompt_lens[rid] for rid, start in zip(out.request_ids, out.start_positions))
    return "decode" if decodes == len(out.request_ids) else ("prefill" if decodes == 0 else "mixed")


def run(mode: str, num_requests: int, rate: float) -> None:
    exp = ExperimentConfig.from_yaml(ROOT / "experiments" / "pd_modes.yaml")
    sim = exp.points[0].simulation
    cfg = sim.sagellm.replace(scheduler={"mode": mode})
    model, _ = build_cost_model(sim.hardware, resolve_shape(sim.model, cfg, sim.base_dir), cfg, sim.base_dir)
    workload = exp.raw["workload"] | {"num_requests": num_requests,
                                      "arrival": {"kind": "poisson", "rate": rate}}
    trace = list(generate(type(sim.workload).from_dict(workload, "workload"), sim.base_dir))
    log: list[tuple[SchedulerOutput, float]] = []
    with SageLLMEngine(cfg) as engine:
        prompts = [tuple(prompt_token_ids(tr, engine.vocab_size, i)) for i, tr in enumerate(trace)]
        lens = {tr.request_id: len(p) for tr, p in zip(trace, prompts)}
        timed = [(tr.arrival_time, GenerateRequest(prompt_token_ids=p, request_id=tr.request_id, temperature=0.0,
                                                   max_new_tokens=tr.output_len, ignore_eos=True))
                 for tr, p in zip(trace, prompts)]
        execute = engine.executor.execute

        def timed_execute(out: SchedulerOutput):
            t0 = time.perf_counter()
            result = execute(out)
            log.append((out, time.perf_counter() - t0))
            return result

        engine.executor.execute = timed_execute
        outputs, _ = replay(engine, timed)
    kinds: dict[str, list[tuple[float, float]]] = {}
    for out, seconds in log:
        if out.request_ids:
            kinds.setdefault(step_kind(out, lens), []).append((model.step_time(out), seconds))
    for kind, pairs in sorted(kinds.items()):
        predicted, measured = sum(p for p, _ in pairs), sum(m for _, m in pairs)
        print(f"{mode:11s} {kind:8s} {len(pairs):5d} steps  predicted {predicted:7.2f} s  measured {measured:7.2f} s"
              f"  measured/predicted {measured / predicted:.3f}")
    print(f"{mode:11s} mean TTFT {statistics.mean(o.metrics.ttft for o in outputs) * 1e3:.0f} ms, "
          f"mean TPOT {statistics.mean(o.metrics.tpot for o in outputs if o.metrics.tpot) * 1e3:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", default=["time_share", "hybrid"], choices=["hybrid", "time_share"])
    p.add_argument("--num-requests", type=int, default=30)
    p.add_argument("--rate", type=float, default=0.4, help="requests per second (one worker)")
    args = p.parse_args()
    for mode in args.modes:
        run(mode, args.num_requests, args.rate)


if __name__ == "__main__":
    main()
