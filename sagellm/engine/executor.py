"""The live executor: forward pass, sampling and stop-string checks for one `SchedulerOutput`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sagellm.core.kv.tiers import RECEIVE
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
    failed is left out of the step and reported in `failed_request_ids`. On a prefill worker,
    `handoff` (a `HandoffSender`) exports the KV of the step's `handoff_ids`: layer by layer while
    the forward pass runs when it is layer-wise, else after it.
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
        self.handoff = None  # a HandoffSender on a prefill worker

    def register(self, request_id: str, sampling: SamplingParams, stream: bool) -> None:
        generator = None
        if not sampling.greedy:
            self._counter += 1
            seed = sampling.seed if sampling.seed is not None else self.base_seed * 1_000_003 + self._counter
            generator = torch.Generator(device=self.runner.device)
            generator.manual_seed(seed)
        detok = IncrementalDetokenizer(self.tokenizer, sampling.stop) if (stream or sampling.stop) else None
        self.states[request_id] = LiveRequestState(sampling, generator, detok, "", [])

    def feed(self, request_id: str, token: int) -> None:
        """Account for a token sampled elsewhere (a prefill worker's first token) as if sampled here."""
        state = self.states[request_id]
        if state.detokenizer is not None:
            state.pending_text += state.detokenizer.add(token)

    def release(self, request_id: str) -> LiveRequestState | None:
        return self.states.pop(request_id, None)

    def execute(self, out: SchedulerOutput) -> StepResult:
        t0 = time.perf_counter()
        ops = out.kv_ops
        # Received hand-offs (last in the list) are whole already: with them, every copy runs first.
        overlap = bool(ops) and self.layerwise is not None and ops[-1].kind != RECEIVE
        handoff = self.handoff if out.handoff_ids else None
        export_layers = handoff is not None and handoff.layerwise
        hook = None
        if overlap or export_layers:
            wait = self.layerwise.wait if overlap else None

            def hook(layer: int) -> None:
                if wait is not None:
                    wait(layer)
                if export_layers:
                    if layer == 0:
                        handoff.begin(self._handoff_blocks(out))
                    else:
                        handoff.layer_done(layer - 1)
        if overlap:
            # Layer by layer: each layer's copies overlap the forward pass of the layers before it.
            failed_blocks = self.layerwise.start(ops)
            try:
                ids, logits, skipped = self.runner.execute(out, failed_blocks, hook)
            finally:
                self.layerwise.finish()
        else:
            failed_blocks = self.transfers.run(ops) if ops else []
            ids, logits, skipped = self.runner.execute(out, failed_blocks, hook)
        if handoff is not None:
            if export_layers:
                handoff.layer_done(self.runner.model.shape.num_layers - 1)
            else:
                handoff.begin(self._handoff_blocks(out))
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

    def _handoff_blocks(self, out: SchedulerOutput) -> list[tuple[str, list[int]]]:
        """(request id, the device blocks of its prompt) for each request the step hands off."""
        bs = self.runner.block_size
        ends = {rid: start + len(toks) for rid, start, toks in zip(out.request_ids, out.start_positions, out.token_ids)}
        return [(rid, self.runner.block_tables[rid][: -(-ends[rid] // bs)]) for rid in out.handoff_ids]
