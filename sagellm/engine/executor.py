"""The live executor: forward pass, sampling and stop-string checks for one `SchedulerOutput`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sagellm.core.outputs import SchedulerOutput, StepResult
from sagellm.core.sampling import SamplingParams
from sagellm.engine.detokenizer import IncrementalDetokenizer
from sagellm.engine.kv_layerwise import LayerwiseTransfer
from sagellm.engine.kv_tiers import KVTransferExecutor
from sagellm.engine.model_runner import ModelRunner
from sagellm.engine.sampler import Sampler
from sagellm.models.tokenizer import TextTokenizer


@dataclass
class LiveRequestState:
    """Executor-side state of one request: how to sample it and its text so far."""

    sampling: SamplingParams
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer | None
    pending_text: str = ""
    pending_tokens: list[int] | None = None


class LiveExecutor:
    """Runs steps on the real model.

    Contract: `register(request_id, sampling)` must precede a request's first step and `release`
    follows its end. `execute(out)` runs the forward pass, samples every request that samples, feeds
    detokenizers (when streaming or stop strings need text) and returns a `StepResult` whose
    `stopped_ids` are the requests whose text hit a stop string and whose `duration` is wall time.
    New text and tokens accumulate in each state's `pending_*` until the engine takes them.
    The step's KV operations run first (`transfers`); a request that would read a block whose load
    failed is left out of the step and reported in `failed_request_ids`.
    """

    def __init__(self, runner: ModelRunner, tokenizer: TextTokenizer, base_seed: int,
                 transfers: KVTransferExecutor | None = None, layerwise: bool = False) -> None:
        self.runner = runner
        self.transfers = transfers
        self.layerwise = LayerwiseTransfer(transfers) if layerwise and transfers is not None else None
        self.tokenizer = tokenizer
        self.sampler = Sampler()
        self.base_seed = base_seed
        self._counter = 0
        self.states: dict[str, LiveRequestState] = {}

    def register(self, request_id: str, sampling: SamplingParams, stream: bool) -> None:
        generator = None
        if not sampling.greedy:
            self._counter += 1
            seed = sampling.seed if sampling.seed is not None else self.base_seed * 1_000_003 + self._counter
            generator = torch.Generator(device=self.runner.device)
            generator.manual_seed(seed)
        detok = IncrementalDetokenizer(self.tokenizer, sampling.stop) if (stream or sampling.stop) else None
        self.states[request_id] = LiveRequestState(sampling, generator, detok, "", [])

    def release(self, request_id: str) -> LiveRequestState | None:
        return self.states.pop(request_id, None)

    def execute(self, out: SchedulerOutput) -> StepResult:
        t0 = time.perf_counter()
        if out.kv_ops and self.layerwise is not None:
            # Layer by layer: each layer's copies overlap the forward pass of the layers before it.
            failed_blocks = self.layerwise.start(out.kv_ops)
            try:
                ids, logits, skipped = self.runner.execute(out, failed_blocks, self.layerwise.wait)
            finally:
                self.layerwise.finish()
        else:
            failed_blocks = self.transfers.run(out.kv_ops) if out.kv_ops else []
            ids, logits, skipped = self.runner.execute(out, failed_blocks)
        sampled: dict[str, int] = {}
        stopped: list[str] = []
        if ids:
            states = [self.states[rid] for rid in ids]
            tokens = self.sampler.sample(logits, [s.sampling for s in states], [s.generator for s in states])
            for rid, state, tok in zip(ids, states, tokens):
                sampled[rid] = tok
                state.pending_tokens.append(tok)
                if state.detokenizer is not None:
                    state.pending_text += state.detokenizer.add(tok)
                    if state.detokenizer.stopped:
                        stopped.append(rid)
        return StepResult(
            step_id=out.step_id,
            sampled_token_ids=sampled,
            stopped_ids=tuple(stopped),
            duration=time.perf_counter() - t0,
            failed_blocks=tuple(failed_blocks),
            failed_request_ids=tuple(skipped),
        )
