"""What one step computes, reduced to the numbers that set its cost (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass

from sagellm.core.outputs import SchedulerOutput


@dataclass(frozen=True)
class BatchShape:
    """One step's work, summed over its requests.

    Fields: `num_tokens` new tokens computed; `num_seqs` requests in the step; `num_decodes` of
    them computing exactly one token after a non-empty context; `num_sampled` rows that go through
    the LM head; `attention_pairs` (query, key) pairs under the causal mask, i.e. for a request
    computing n tokens after c cached ones, n*c + n*(n+1)/2; `kv_context_tokens` tokens of K/V each
    request attends to (c + n, summed), which is what attention reads.
    """

    num_tokens: int = 0
    num_seqs: int = 0
    num_decodes: int = 0
    num_sampled: int = 0
    attention_pairs: int = 0
    kv_context_tokens: int = 0

    @classmethod
    def from_chunks(cls, chunks: list[tuple[int, int]] | tuple[tuple[int, int], ...], num_sampled: int | None = None
                    ) -> BatchShape:
        """From (cached context, new tokens) pairs; every request samples unless `num_sampled` says."""
        tokens = pairs = ctx = decodes = 0
        for cached, n in chunks:
            if n <= 0 or cached < 0:
                raise ValueError(f"chunk (context={cached}, tokens={n}) needs tokens > 0 and context >= 0")
            tokens += n
            pairs += n * cached + n * (n + 1) // 2
            ctx += cached + n
            decodes += n == 1 and cached > 0
        return cls(tokens, len(chunks), decodes, len(chunks) if num_sampled is None else num_sampled, pairs, ctx)

    @classmethod
    def from_output(cls, out: SchedulerOutput) -> BatchShape:
        return cls(*batch_vector(out))

    def as_vector(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_tokens, self.num_seqs, self.num_decodes, self.num_sampled, self.attention_pairs,
                self.kv_context_tokens)


def batch_vector(out: SchedulerOutput) -> tuple[int, int, int, int, int, int]:
    """The fields of `BatchShape.from_output(out)` as a tuple, without building the object.

    Written with C-level passes (`map`, `sum`, `count`) plus one comprehension that keeps the
    multi-token chunks, because the simulator calls it every step with mostly one-token decodes.
    """
    starts = out.start_positions
    lens = list(map(len, out.token_ids))
    n_seqs = len(lens)
    tokens = sum(lens)
    s = sum(starts)
    ctx = s + tokens
    zeros = starts.count(0)
    if tokens == n_seqs:  # one token each
        return tokens, n_seqs, n_seqs - zeros, sum(out.samples), ctx, ctx
    chunks = [(n, c) for n, c in zip(lens, starts) if n > 1]
    # one-token entries contribute c + 1 pairs each; chunks n*c + n*(n+1)/2
    pairs = s + (n_seqs - len(chunks))
    for n, c in chunks:
        pairs += n * c + n * (n + 1) // 2 - c
        if c == 0:
            zeros -= 1
    return tokens, n_seqs, n_seqs - len(chunks) - zeros, sum(out.samples), pairs, ctx
