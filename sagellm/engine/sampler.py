"""Token sampling: greedy, temperature, top-k, top-p, with a per-request random generator."""

from __future__ import annotations

import torch

from sagellm.core.sampling import SamplingParams


class Sampler:
    """Picks one token per row of a logits matrix.

    Contract: `sample(logits, params, generators)` returns one token id per row; greedy rows take
    the argmax (first index on ties); other rows draw from the filtered, temperature-scaled
    distribution with their own `torch.Generator`, so a seeded request draws the same tokens
    whatever else is in the batch. Does not modify `logits`.
    """

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> list[int]:
        tokens = logits.argmax(dim=-1).tolist()
        for i, p in enumerate(params):
            if p.greedy:
                continue
            tokens[i] = self._draw(logits[i], p, generators[i])
        return tokens

    @staticmethod
    def _draw(row: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
        scaled = row.float() / p.temperature
        if p.top_k > 0 and p.top_k < scaled.numel():
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
            drop = before >= p.top_p
            drop[0] = False
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(scaled, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator).item())
